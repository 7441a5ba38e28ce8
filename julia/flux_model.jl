# The classify and train stages' command line: the synthflux CNN over preprocessed .npz shards.
#
#   julia --project=julia julia/flux_model.jl --input DIR_OR_SHARDS... --weights W --output DIR \
#         [--batch-size B] [--seed S]
#   julia --project=julia julia/flux_model.jl IMAGE.png --weights W
#   julia --project=julia julia/flux_model.jl train --input NAME=DIR... --weights INIT.npz \
#         --output DIR [--epochs E --lr X ...]      (or: ... train @job.args)
#
# All the work is in src/SynthFluxModel.jl (tested by test/runtests.jl); see README.md.

# The module from a sysimage that holds it (`make julia-sysimage`, the Docker image's), compiled,
# if it was built from these very sources; else included from them (also without
# --project=julia, e.g. with Flux and NPZ from the default environment). Into a module of its
# own, so that it never replaces a sysimage's.
const SynthFlux = let src = joinpath(@__DIR__, "src"),
        built = isdefined(Main, :SynthFluxModel) ? Main.SynthFluxModel : nothing
    if built !== nothing && built.source_digest(src) == built.SOURCE_DIGEST
        built
    else
        built === nothing || println(stderr, "flux_model: note: julia/src changed since the ",
            "sysimage was built; compiling it anew (rebuild it: make julia-sysimage)")
        Base.include(Module(), joinpath(src, "SynthFluxModel.jl"))
    end
end

if abspath(PROGRAM_FILE) == @__FILE__
    exit(SynthFlux.main(ARGS))
end
