#!/usr/bin/env python3
"""CONTRACT TEST DOUBLE for julia/flux_model.jl -- not the network, not a model.

It implements only flux_model.jl's command-line and file contract, so the classify driver
(synthflux/classify.py) can be tested against a real Docker engine or subprocess without Julia:

    flux_model_standin.py [--project=DIR] [flux_model.jl] --input DIR_OR_SHARDS --weights W
                          --output DIR [--batch-size B] [--seed S]

(`--project=...` and a `*.jl` path are accepted and ignored, so it can be invoked exactly as
`julia --project=julia julia/flux_model.jl ...` would be.) For every shard-NNNNN.npz it writes
OUTPUT/shard-NNNNN.probs.npz atomically: `probs` float32 (N, K) -- a softmax of a fixed function
of each image's pixels, K taken from the weights' `arch` vector when present, else 2 -- and `ids`
int64 (N,). It prints one line per shard and a summary; errors are one line on stderr,
`flux_model: error: <file>: <problem>`, exit 1.

Misbehaviour for tests, from a JSON object in env SYNTHFLUX_STANDIN or in the file
INPUT/standin-control.json (the file also reaches a container, env does not):
    {"fail": "shard-00001.npz"}      print a few lines, then the error line, exit 3 there
    {"hang": true}                   print a line, then sleep forever (timeout tests)
    {"hold": true}                   wait (<= 120 s) for INPUT/standin-release to appear
    {"allocate_mb": 400}             touch that much memory first (memory-limit tests)
    {"skip": "shard-00001.npz"}      write no output for that shard (missing output)
    {"malformed": "shard-00001.npz", "kind": "shape" | "nan" | "sum" | "ids" | "garbage"}

    flux_model_standin.py [...] train --input NAME=DIR... --weights INIT --output DIR
                          [--epochs E] [other training options, ignored]

is the training contract: for each epoch a `progress:` and a `metrics: {...}` line, then
OUTPUT/checkpoint.npz, OUTPUT/metrics.jsonl and OUTPUT/weights.npz (the initial weights, as
they are: nothing is learned). With a checkpoint already in OUTPUT it prints
`resume: from epoch N` and goes on from there. Misbehaviour: {"fail_epoch": 2} exits 3 in
that epoch; "hold" waits before the first epoch, as above, {"hold_epoch": N} before epoch N
(after epoch N-1's checkpoint).

    flux_model_standin.py [...] serve

is the server contract (julia/src/serve.jl): one job a line on stdin, its arguments separated by
tabs, each run as above in this process, its output (errors included) on stdout, then
`flux_model serve: job N exit C`. The misbehaviour above applies per job ("hang" hangs the
server); {"crash": true} makes the server itself exit 9 in the middle of a job.
Only Python 3 and NumPy: the test image holds nothing else.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

import numpy as np

PROG = "flux_model"
SERVING = False  # in `serve` mode


def die(file: str, problem: str, code: int = 1) -> None:
    print(f"{PROG}: error: {file}: {problem}", file=sys.stderr, flush=True)
    sys.exit(code)


def parse(argv: list[str]) -> dict[str, str]:
    opts: dict[str, str] = {}
    inputs: list[str] = []
    it = iter(argv)
    for arg in it:
        if arg.startswith("--project") or arg.endswith(".jl"):
            continue  # what `julia --project=... flux_model.jl` would consume
        if arg in ("--input", "--weights", "--output", "--batch-size", "--seed"):
            value = next(it, None)
            if value is None:
                die(arg, "needs a value")
            if arg == "--input":
                inputs.append(value)
            else:
                opts[arg[2:]] = value
        elif inputs and not arg.startswith("--"):
            inputs.append(arg)  # --input a.npz b.npz ...
        else:
            die(arg, "unknown argument")
    for required in ("weights", "output"):
        if required not in opts:
            die(f"--{required}", "is required")
    if not inputs:
        die("--input", "is required")
    opts["input"] = "\0".join(inputs)
    return opts


def shard_files(inputs: list[str]) -> list[str]:
    if len(inputs) == 1 and os.path.isdir(inputs[0]):
        folder = inputs[0]
        names = sorted(
            n
            for n in os.listdir(folder)
            if n.startswith("shard-") and n.endswith(".npz") and not n.endswith(".probs.npz")
        )
        if not names:
            die(folder, "no shard-*.npz files")
        return [os.path.join(folder, n) for n in names]
    return inputs


def control(inputs: list[str]) -> dict:
    raw = os.environ.get("SYNTHFLUX_STANDIN", "")
    folder = inputs[0] if os.path.isdir(inputs[0]) else os.path.dirname(inputs[0])
    path = os.path.join(folder, "standin-control.json")
    if not raw and os.path.isfile(path):
        with open(path) as f:
            raw = f.read()
    return json.loads(raw) if raw else {}


def n_classes(weights: str) -> int:
    try:
        with np.load(weights, allow_pickle=False) as z:
            return int(z["arch"][4]) if "arch" in z.files else 2
    except (OSError, ValueError) as e:
        die(weights, f"cannot read weights ({e})")
    return 2  # unreachable


def fake_probs(images: np.ndarray, k: int) -> np.ndarray:
    """A fixed, pixel-dependent softmax: deterministic, varied, nothing learned."""
    n = images.shape[-1]
    mean = images.reshape(-1, n, order="F").mean(axis=0).astype(np.float64)  # (N,)
    logits = np.sin(np.outer(mean * 7.0 + 1.0, np.arange(1, k + 1)))  # (N, K)
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def write_atomic(path: str, arrays: dict[str, np.ndarray] | None, raw: bytes = b"") -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".standin.", suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        if arrays is None:
            f.write(raw)
        else:
            np.savez(f, **arrays)
    os.replace(tmp, path)


def spoil(arrays: dict[str, np.ndarray], kind: str) -> dict[str, np.ndarray] | None:
    probs, ids = arrays["probs"], arrays["ids"]
    if kind == "shape":
        return {"probs": probs[:, :1].copy(), "ids": ids}
    if kind == "nan":
        probs = probs.copy()
        probs[0, 0] = np.nan
        return {"probs": probs, "ids": ids}
    if kind == "sum":
        return {"probs": probs * 0.5, "ids": ids}
    if kind == "ids":
        return {"probs": probs, "ids": ids + 1000}
    return None  # "garbage": not an npz at all


def train(argv: list[str]) -> int:
    """The training contract: metrics lines, a checkpoint per epoch, weights.npz at the end."""
    inputs, opts, it = [], {"epochs": "10"}, iter(argv)
    for arg in it:
        if arg.startswith("--project") or arg.endswith(".jl"):
            continue
        value = next(it, None) if arg.startswith("--") else None
        if arg == "--input":
            inputs.append(value)
            while True:  # NAME=DIR ... until the next option
                nxt = next(it, None)
                if nxt is None:
                    break
                if nxt.startswith("--"):
                    opts[nxt[2:]] = next(it, "")
                    break
                inputs.append(nxt)
        elif arg.startswith("--") and value is not None:
            opts[arg[2:]] = value
    folders = [i.split("=", 1)[1] for i in inputs if i and "=" in i]
    if not folders or "weights" not in opts or "output" not in opts:
        die("--input", "train needs --input NAME=DIR, --weights and --output")
    ctl = control(folders)
    crash_if_asked(ctl)
    out, epochs = opts["output"], int(opts["epochs"])
    if not os.path.isdir(out):
        die(out, "output folder does not exist")
    with np.load(opts["weights"], allow_pickle=False) as z:
        weights = {k: z[k] for k in z.files}
    start = 0
    checkpoint = os.path.join(out, "checkpoint.npz")
    if os.path.isfile(checkpoint):
        with np.load(checkpoint) as z:
            start = int(z["state"][1])
        print(f"resume: from epoch {start}", flush=True)
    if ctl.get("hold"):
        wait_for_release(folders[0])
    lines = []
    for epoch in range(1, epochs + 1):
        loss = 1.0 / epoch
        m = {"epoch": epoch, "steps": 2 * epoch, "train_loss": loss, "train_accuracy": 0.5,
             "val_loss": loss + 0.1, "val_accuracy": 0.5, "images_per_s": 100.0,
             "seconds": 0.01, "best_epoch": epoch}  # fmt: skip
        lines.append(json.dumps(m))
        if epoch <= start:
            continue
        if ctl.get("hold_epoch") == epoch:
            wait_for_release(folders[0])
        if ctl.get("fail_epoch") == epoch:
            die(out, f"simulated failure in epoch {epoch} (contract stand-in)", code=3)
        print("progress: 2/2", flush=True)
        print(f"metrics: {json.dumps(m)}", flush=True)
        write_atomic(checkpoint, {"state": np.array([1, epoch, 2 * epoch, epoch, 0, 0]),
                                  "arch": weights["arch"], "history": np.zeros((epoch, 8)),
                                  "best_val_loss": np.array([loss + 0.1])})  # fmt: skip
        write_atomic(
            os.path.join(out, "metrics.jsonl"), None, raw="\n".join(lines).encode() + b"\n"
        )
    write_atomic(os.path.join(out, "weights.npz"), weights)
    print(f"{PROG}: trained (contract stand-in: nothing learned)", flush=True)
    return 0


def wait_for_release(folder: str) -> None:
    """{"hold": true} and {"hold_epoch": N}: wait (<= 120 s) for FOLDER/standin-release."""
    release = os.path.join(folder, "standin-release")
    deadline = time.monotonic() + 120
    while not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.05)


def crash_if_asked(ctl: dict) -> None:
    """{"crash": true} in a server: the whole process dies mid-job (a job's error does not)."""
    if ctl.get("crash") and SERVING:
        print(f"{PROG}: the server crashes as asked", flush=True)
        os._exit(9)


def serve() -> int:
    """Jobs from stdin, one a line, in this process; each ended by its end line."""
    global SERVING
    SERVING = True
    sys.stderr = sys.stdout  # a job's error line comes before its end line
    for n, line in enumerate(sys.stdin, start=1):
        words = line.rstrip("\r\n").split("\t")
        try:
            code = main(words)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        print(f"flux_model serve: job {n} exit {code}", flush=True)
    return 0


def main(argv: list[str]) -> int:
    words = [a for a in argv if not (a.startswith("--project") or a.endswith(".jl"))]
    if words == ["serve"]:
        return serve()
    if "train" in argv:
        return train(argv[argv.index("train") + 1 :])
    opts = parse(argv)
    inputs = opts["input"].split("\0")
    ctl = control(inputs)
    crash_if_asked(ctl)
    files = shard_files(inputs)
    k = n_classes(opts["weights"])
    out = opts["output"]
    if not os.path.isdir(out):
        die(out, "output folder does not exist")
    print(f"{PROG} (contract stand-in): {len(files)} shards, K = {k}", flush=True)
    if ctl.get("allocate_mb"):
        hog = np.ones(int(ctl["allocate_mb"]) * 2**20, dtype=np.uint8)  # ones: really touched
        print(f"{PROG}: holding {hog.nbytes >> 20} MB", flush=True)
    if ctl.get("hang"):
        print(f"{PROG}: hanging as asked", flush=True)
        while True:
            time.sleep(3600)
    if ctl.get("hold"):
        wait_for_release(os.path.dirname(files[0]))
    start = time.monotonic()
    total = 0
    for path in files:
        name = os.path.basename(path)
        if ctl.get("fail") == name:
            print(f"{PROG}: reading {name}", flush=True)
            die(name, "simulated failure (contract stand-in)", code=3)
        try:
            with np.load(path, allow_pickle=False) as z:
                images, ids = z["images"], z["ids"]
        except (OSError, ValueError, KeyError) as e:
            die(name, f"cannot read shard ({e})")
        arrays = {"probs": fake_probs(images, k), "ids": ids.astype(np.int64)}
        target = os.path.join(out, name[: -len(".npz")] + ".probs.npz")
        if ctl.get("skip") == name:
            print(f"{PROG}: {name}: skipped (contract stand-in)", flush=True)
            continue
        if ctl.get("malformed") == name:
            spoiled = spoil(arrays, ctl.get("kind", "shape"))
            write_atomic(target, spoiled, raw=b"this is not an npz file")
        else:
            write_atomic(target, arrays)
        total += len(ids)
        print(f"{PROG}: {name}: {len(ids)} images -> {os.path.basename(target)}", flush=True)
    secs = time.monotonic() - start
    print(f"{PROG}: done: {total} images in {len(files)} shards, {secs:.2f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
