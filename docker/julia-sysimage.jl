# The `script` of the PackageCompiler sysimage (`make julia-sysimage`, docker/julia.Dockerfile).
# It runs in the process that writes the sysimage, after Flux and NPZ are loaded: it includes
# SynthFluxModel, so that the module is saved in the sysimage (flux_model.jl uses it while
# julia/src is unchanged), and compiles every method that the warm-up ran (docker/julia-warmup.jl
# run with --trace-compile=$SYNTHFLUX_TRACE), so that their code is saved too. It cannot run the
# warm-up itself: that process runs no module's __init__ (no RNG, NPZ's table of types empty).
include(joinpath(ENV["SYNTHFLUX_JULIA_DIR"], "src", "SynthFluxModel.jl"))

let staging = Module(), trace = ENV["SYNTHFLUX_TRACE"], compiled = 0
    # The traced signatures name modules as Main sees them.
    for (id, mod) in Base.loaded_modules
        id.name in ("Main", "Core", "Base") || Core.eval(staging, :(const $(nameof(mod)) = $mod))
    end
    Core.eval(staging, :(const SynthFluxModel = $(Main.SynthFluxModel)))
    for line in eachline(trace)
        try  # a closure's type has no name to refer to: skipped
            Base.include_string(staging, line)
            compiled += 1
        catch
        end
    end
    println("julia-sysimage: compiled $compiled of the warm-up's $(countlines(trace)) methods")
end
