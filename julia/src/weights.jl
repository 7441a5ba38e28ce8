# weights.npz: the spec and its named Float32 arrays in Flux's layout (julia/README.md).

"""
    Weights(spec, arrays)

A spec and its named Float32 arrays (`conv1_weight`, `conv1_bias`, …, `dense_weight`,
`dense_bias`) in Flux's layout: conv kernels (kw, kh, cin, cout), dense (n_classes, features).
"""
struct Weights
    spec::ArchSpec
    arrays::Dict{String,Array{Float32}}
end

"""Throw `ArgumentError` unless `arrays` is exactly the finite Float32 set `spec` needs."""
function check_arrays(spec::ArchSpec, arrays::AbstractDict)
    shapes = expected_shapes(spec)
    names = Set(first.(shapes))
    unknown = sort!([k for k in keys(arrays) if !(k in names) && k != "arch"])
    isempty(unknown) || throw(ArgumentError("unexpected arrays $(unknown)"))
    for (name, shape) in shapes
        haskey(arrays, name) || throw(ArgumentError("missing array `$name`"))
        a = arrays[name]
        (a isa AbstractArray{Float32} && size(a) == shape) || throw(ArgumentError(
            "`$name` must be float32 $shape for this arch, got $(describe(a))"))
        all(isfinite, a) || throw(ArgumentError("`$name` holds NaN or Inf"))
    end
    return nothing
end

"""
    init_weights(spec; seed=0) -> Weights

Fresh weights, a pure function of `spec` and `seed` (a private MersenneTwister, no global RNG):
weights and biases uniform in ±1/sqrt(fan_in), as PyTorch initialises Conv2d and Linear.
The numbers differ from `synthflux.reference.init_weights` (another RNG); the written
weights.npz is the shared record.
"""
function init_weights(spec::ArchSpec; seed::Integer=0)
    rng = MersenneTwister(seed)
    arrays = Dict{String,Array{Float32}}()
    for (name, shape) in expected_shapes(spec)
        layer = name[1:findlast(==('_'), name)-1]
        wshape = Dict(expected_shapes(spec))[layer * "_weight"]
        fan_in = layer == "dense" ? n_features(spec) : prod(wshape[1:3])
        bound = Float32(1 / sqrt(fan_in))
        arrays[name] = (rand(rng, Float32, shape...) .* 2 .- 1) .* bound
    end
    return Weights(spec, arrays)
end

"""
    load_weights(path) -> Weights

Read `weights.npz`; throws `InputError(path, …)` if it is missing, unreadable, or its arrays
do not fit its `arch`.
"""
function load_weights(path::AbstractString)
    d = read_npz(path, nothing, "weights file")
    haskey(d, "arch") || throw(InputError(path, "no `arch` array (the architecture spec)"))
    arch = d["arch"]
    arch isa AbstractVector{<:Integer} ||
        throw(InputError(path, "`arch` must be an integer vector, got $(describe(arch))"))
    spec = try
        spec_from_arch(arch)
    catch e
        e isa ArgumentError || rethrow()
        throw(InputError(path, "bad `arch`: $(e.msg)"))
    end
    try
        check_arrays(spec, d)
    catch e
        e isa ArgumentError || rethrow()
        throw(InputError(path, e.msg))
    end
    arrays = Dict{String,Array{Float32}}(k => Array{Float32}(v) for (k, v) in d if k != "arch")
    return Weights(spec, arrays)
end

"""Write `weights.npz` atomically: `arch` (Int64) plus every array (Float32)."""
function save_weights(path::AbstractString, w::Weights)
    check_arrays(w.spec, w.arrays)
    vars = Dict{String,Any}("arch" => arch_vector(w.spec))
    for (k, v) in w.arrays
        vars[k] = v
    end
    atomic_npzwrite(path, vars)
    return path
end
