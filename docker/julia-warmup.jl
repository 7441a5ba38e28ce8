# Run at image build time (docker/julia.Dockerfile): classify one random shard end to end, the
# way the classify stage does. It proves the image works before it is tagged, and it is the
# workload whose compiled code goes into the optional PackageCompiler sysimage.
using NPZ

include("/opt/synthflux/julia/src/SynthFluxModel.jl")

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
end
