"""examples/k8s/: valid Kubernetes objects (strict schema check), and the --shard contract.

kubernetes-validate checks each document against the OpenAPI schemas of a Kubernetes
release, strictly (an unknown or misspelt field fails), offline: the schemas ship with it.
"""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest
import yaml

from conftest import REPO
from synthflux.cli import build_parser

K8S = REPO / "examples" / "k8s"
# The oldest release that runs the examples as written (backoffLimitPerIndex on by default),
# and the newest the validator knows.
VERSIONS = ["1.29.0", kubernetes_validate.latest_version()]
INDEX = "$(JOB_COMPLETION_INDEX)"


def documents() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def indexed_jobs() -> dict[str, dict[str, Any]]:
    return {
        doc["metadata"]["name"]: doc
        for _, doc in documents()
        if doc["kind"] == "Job" and doc["spec"].get("completionMode") == "Indexed"
    }


def test_the_examples_exist() -> None:
    names = {name for name, _ in documents()}
    assert names == {
        "storage.yaml",
        "generate.yaml",
        "preprocess.yaml",
        "train.yaml",
        "classify.yaml",
    }
    assert set(indexed_jobs()) == {"synthflux-generate", "synthflux-preprocess"}


@pytest.mark.parametrize("version", VERSIONS)
def test_every_document_is_valid(version: str) -> None:
    for name, doc in documents():
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{name}: {doc['kind']} {doc['metadata']['name']}: {e.message}")


def test_the_validator_catches_a_misspelt_field() -> None:
    job = indexed_jobs()["synthflux-generate"]
    job["spec"]["template"]["spec"]["containers"][0]["argz"] = ["generate"]
    with pytest.raises(kubernetes_validate.ValidationError, match="argz"):
        kubernetes_validate.validate(job, VERSIONS[0], strict=True)


@pytest.mark.parametrize("stage", ["generate", "preprocess"])
def test_indexed_jobs_follow_the_shard_contract(stage: str) -> None:
    """Pod k runs `synthflux STAGE ... --shard k/N` with N = completions, valid CLI args."""
    job = indexed_jobs()[f"synthflux-{stage}"]
    n = job["spec"]["completions"]
    assert job["spec"]["parallelism"] <= n
    (container,) = job["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container.get("env", [])}
    assert env["JOB_COMPLETION_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    )
    args = container["args"]
    assert args[0] == stage
    assert args[args.index("--shard") + 1] == f"{INDEX}/{n}"
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert args[1].startswith(mounts["config"] + "/") and args[3] == mounts["data"]
    owners = []
    for k in range(n):  # what each pod gets once Kubernetes expands the index
        parsed = build_parser().parse_args([a.replace(INDEX, str(k)) for a in args])
        assert parsed.command == stage
        owners.append(parsed.shard)  # parsed and checked by argparse
    for item in range(10 * n):  # every item belongs to exactly one pod
        assert sum(s.owns(item) for s in owners) == 1


def test_classify_runs_the_julia_image_then_checks_evaluates_and_reports() -> None:
    """As compose.yaml: flux_model.jl writes each source's probabilities, then the Python
    image checks them (`classify --backend none`), evaluates and reports, in that order."""
    job = {doc["metadata"]["name"]: doc for _, doc in documents()}["synthflux-classify"]
    spec = job["spec"]["template"]["spec"]
    julia, *python = spec["initContainers"] + spec["containers"]
    assert julia["image"].startswith("synthflux-julia:")
    loop = " ".join(julia["args"])
    assert "/data/preprocessed/*/" in loop and "--weights /data/model/weights.npz" in loop
    commands = [build_parser().parse_args(c["args"]) for c in python]
    assert [c.command for c in commands] == ["classify", "evaluate", "report"]
    assert commands[0].backend == commands[1].backend == "none"


def test_train_prepares_trains_with_the_julia_image_and_collects() -> None:
    job = {doc["metadata"]["name"]: doc for _, doc in documents()}["synthflux-train"]
    spec = job["spec"]["template"]["spec"]
    prepare, julia, collect = spec["initContainers"] + spec["containers"]
    assert julia["image"].startswith("synthflux-julia:")
    assert julia["args"] == ["@/data/training/job.args"] and "command" not in julia
    for python in (prepare, collect):
        parsed = build_parser().parse_args(python["args"])
        assert (parsed.command, parsed.backend, parsed.data) == ("train", "none", "/data")


def test_all_pods_share_one_data_volume() -> None:
    claims = {
        v["persistentVolumeClaim"]["claimName"]
        for _, doc in documents()
        if doc["kind"] == "Job"
        for v in doc["spec"]["template"]["spec"]["volumes"]
        if v["name"] == "data"
    }
    assert claims == {"synthflux-data"}
    pvc = {doc["metadata"]["name"]: doc for _, doc in documents()}["synthflux-data"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]  # pods on several nodes at once
