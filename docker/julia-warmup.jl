# Run at image build time (docker/julia.Dockerfile) and by `make julia-sysimage`: classify one
# random shard end to end, the way the classify stage does, then train on it for an epoch, the
# way the train stage does. It proves the image works before it is tagged, and with
# --trace-compile it lists the methods that docker/julia-sysimage.jl compiles into the sysimage.
using NPZ

# The image's julia/ folder; `make julia-sysimage` points it at the repository's. A sysimage's
# SynthFluxModel is used as it is (the check after the sysimage is built).
isdefined(Main, :SynthFluxModel) ||
    include(joinpath(get(ENV, "SYNTHFLUX_JULIA_DIR", "/opt/synthflux/julia"), "src", "SynthFluxModel.jl"))

mktempdir() do dir
    n = 4
    npzwrite(joinpath(dir, "shard-00000.npz"),
             Dict("images" => rand(Float32, 16, 16, 1, n),
                  "labels" => collect(Int64, 0:n-1) .% 2,
                  "ids" => collect(Int64, 0:n-1)))
    args = ["--input", dir, "--weights", joinpath(dir, "weights.npz"),
            "--output", joinpath(dir, "out"), "--batch-size", "2"]
    code = SynthFluxModel.main(args)
    code == 0 || error("warm-up classification failed with exit code $code")
    isfile(joinpath(dir, "out", "shard-00000.probs.npz")) || error("warm-up wrote no probs")
    train = ["train", "--input", "warmup=$dir", "--weights", joinpath(dir, "weights.npz"),
             "--output", joinpath(dir, "run"), "--epochs", "1", "--batch-size", "2",
             "--val-fraction", "0", "--flip", "1", "--shift", "1"]
    code = SynthFluxModel.main(train)
    code == 0 || error("warm-up training failed with exit code $code")
    isfile(joinpath(dir, "run", "weights.npz")) || error("warm-up training wrote no weights")
end
