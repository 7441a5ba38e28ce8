# The classify and train stages' command line: the synthflux CNN over preprocessed .npz shards.
#
#   julia --project=julia julia/flux_model.jl --input DIR_OR_SHARDS... --weights W --output DIR \
#         [--batch-size B] [--seed S]
#   julia --project=julia julia/flux_model.jl IMAGE.png --weights W
#   julia --project=julia julia/flux_model.jl train --input NAME=DIR... --weights INIT.npz \
#         --output DIR [--epochs E --lr X ...]      (or: ... train @job.args)
#
# All the work is in src/SynthFluxModel.jl (tested by test/runtests.jl); see README.md.

# Included rather than `using SynthFluxModel`, so this file also runs without --project=julia
# (e.g. with Flux and NPZ from the default environment).
include(joinpath(@__DIR__, "src", "SynthFluxModel.jl"))

if abspath(PROGRAM_FILE) == @__FILE__
    exit(SynthFluxModel.main(ARGS))
end
