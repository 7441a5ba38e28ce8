"""
    SynthFluxModel

The synthflux classifier: a small Flux CNN over WHCN image batches, its weights in a
language-neutral `weights.npz`, and the shard I/O of the classify stage. `julia/flux_model.jl`
is the command line around [`main`](@ref); `synthflux.reference` is its PyTorch twin.

Written against Flux's stable forward-pass API only (Chain, Conv, MaxPool, Dense, relu,
softmax, reshape), so the same code runs on Julia 1.10 with Flux 0.14-0.16 and on Julia 1.5
with Flux 0.12.
"""
module SynthFluxModel

using Flux: Chain, Conv, Dense, MaxPool, relu, softmax
using NPZ: NPZ, npzread, npzwrite
using Printf: @printf, @sprintf
using Random: MersenneTwister

export ArchSpec, Weights, InputError, build_model, load_weights, init_weights, save_weights,
    read_shard, predict, write_probs, probs_name, image_to_whcn, main

const FORMAT_VERSION = 1
const ARCH_HEADER = 7  # format_version, W, H, C, K, kernel, n_blocks; then one entry per block

# ---------------------------------------------------------------------------------------------
# Errors

"""
    InputError(file, msg)

A problem the user can fix, tied to a file (or a command-line option): a missing or malformed
shard, weights that don't fit, a bad argument. The CLI prints it as one line.
"""
struct InputError <: Exception
    file::String
    msg::String
end

Base.showerror(io::IO, e::InputError) = print(io, e.file, ": ", e.msg)

# The first line of any exception's message, for one-line error reports.
function first_line(e)
    msg = e isa ArgumentError ? e.msg : sprint(showerror, e)
    lines = split(strip(msg), '\n')
    return isempty(lines) ? string(typeof(e)) : String(strip(lines[1]))
end

# numpy's names, because the files come from Python and users read numpy docs.
dtype_name(T::Type) = T === Float32 ? "float32" : T === Float64 ? "float64" :
    T === Int64 ? "int64" : T === Int32 ? "int32" : lowercase(string(T))
describe(x::AbstractArray) = string(dtype_name(eltype(x)), " ", size(x))
describe(x) = string(dtype_name(typeof(x)), " scalar")

# ---------------------------------------------------------------------------------------------
# Architecture spec

"""
    ArchSpec(width, height, channels, n_classes, kernel, block_channels)

The network's shape: `length(block_channels)` blocks of Conv(kernel×kernel, pad=kernel÷2) →
relu → MaxPool((2,2)), then Dense to `n_classes` logits. Stored in `weights.npz` as the Int64
vector `arch` (see julia/README.md). Throws `ArgumentError` for a shape that cannot work.
"""
struct ArchSpec
    width::Int
    height::Int
    channels::Int
    n_classes::Int
    kernel::Int
    block_channels::Vector{Int}

    function ArchSpec(width::Integer, height::Integer, channels::Integer, n_classes::Integer,
                      kernel::Integer, block_channels::AbstractVector{<:Integer})
        for (name, v) in (("width", width), ("height", height), ("channels", channels),
                          ("kernel", kernel))
            v >= 1 || throw(ArgumentError("$name must be >= 1, got $v"))
        end
        n_classes >= 2 || throw(ArgumentError("n_classes must be >= 2, got $n_classes"))
        # An odd kernel with pad k÷2 keeps W and H, so Flux and PyTorch agree on every size.
        isodd(kernel) || throw(ArgumentError("kernel must be odd, got $kernel"))
        (!isempty(block_channels) && all(c -> c >= 1, block_channels)) ||
            throw(ArgumentError("block channels must be >= 1 each, got $(collect(block_channels))"))
        n = length(block_channels)
        (width >> n >= 1 && height >> n >= 1) || throw(ArgumentError(
            "$(width)x$(height) is too small for $n 2x2 pooling blocks"))
        return new(width, height, channels, n_classes, kernel, collect(Int, block_channels))
    end
end

Base.:(==)(a::ArchSpec, b::ArchSpec) = all(getfield(a, f) == getfield(b, f) for f in fieldnames(ArchSpec))

"""(W', H', C') after the conv blocks: each 2×2 max-pool halves W and H, rounding down."""
function feature_shape(spec::ArchSpec)
    n = length(spec.block_channels)
    return (spec.width >> n, spec.height >> n, spec.block_channels[end])
end

n_features(spec::ArchSpec) = prod(feature_shape(spec))

arch_vector(spec::ArchSpec) = Int64[FORMAT_VERSION, spec.width, spec.height, spec.channels,
    spec.n_classes, spec.kernel, length(spec.block_channels), spec.block_channels...]

"""Parse the `arch` vector of a weights file; throws `ArgumentError` if it makes no sense."""
function spec_from_arch(arch::AbstractVector{<:Integer})
    length(arch) >= ARCH_HEADER ||
        throw(ArgumentError("`arch` needs at least $ARCH_HEADER entries, got $(length(arch))"))
    version, w, h, c, k, kernel, n_blocks = arch[1:ARCH_HEADER]
    version == FORMAT_VERSION ||
        throw(ArgumentError("unsupported weights format version $version, expected $FORMAT_VERSION"))
    length(arch) == ARCH_HEADER + n_blocks ||
        throw(ArgumentError("`arch` says $n_blocks blocks but has $(length(arch)) entries"))
    return ArchSpec(w, h, c, k, kernel, arch[ARCH_HEADER+1:end])
end

"""Every Float32 array `weights.npz` must hold, in order, with its size in Flux's layout."""
function expected_shapes(spec::ArchSpec)
    shapes = Pair{String,Tuple}[]
    cin = spec.channels
    for (i, cout) in enumerate(spec.block_channels)
        push!(shapes, "conv$(i)_weight" => (spec.kernel, spec.kernel, cin, cout))
        push!(shapes, "conv$(i)_bias" => (cout,))
        cin = cout
    end
    push!(shapes, "dense_weight" => (spec.n_classes, n_features(spec)))
    push!(shapes, "dense_bias" => (spec.n_classes,))
    return shapes
end

# ---------------------------------------------------------------------------------------------
# Weights

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

# ---------------------------------------------------------------------------------------------
# Model

# Flux's flatten in column-major order: (W', H', C', N) -> (W'*H'*C', N). The same order as
# PyTorch's row-major flatten of (N, C', H', W'), so the Dense matrix is shared as is.
flatten_whcn(x) = reshape(x, :, size(x, ndims(x)))

"""
    build_model(w::Weights) -> Chain
    build_model(spec::ArchSpec; seed=0) -> Chain

The CNN with the given (or freshly initialised) weights. It returns logits (K × N); apply
`softmax` at inference, as [`predict`](@ref) does.
"""
function build_model(w::Weights)
    spec = w.spec
    check_arrays(spec, w.arrays)
    layers = Any[]
    for i in 1:length(spec.block_channels)
        # `Conv(weight, bias, σ; pad)` is the same constructor on Flux 0.12 and 0.14+.
        push!(layers, Conv(w.arrays["conv$(i)_weight"], w.arrays["conv$(i)_bias"], relu;
                           pad=spec.kernel ÷ 2))
        push!(layers, MaxPool((2, 2)))
    end
    push!(layers, flatten_whcn)
    push!(layers, Dense(Matrix{Float32}(w.arrays["dense_weight"]),
                        Vector{Float32}(w.arrays["dense_bias"])))
    return Chain(layers...)
end

build_model(spec::ArchSpec; seed::Integer=0) = build_model(init_weights(spec; seed=seed))

"""
    predict(model, x; batch_size=64) -> Matrix{Float32}

Class probabilities (K × N) for a WHCN batch `x`, computed `batch_size` images at a time.
"""
function predict(model, x::AbstractArray{Float32,4}; batch_size::Integer=64)
    batch_size >= 1 || throw(ArgumentError("batch_size must be >= 1, got $batch_size"))
    n = size(x, 4)
    if n == 0  # still return K rows: run one blank image to learn K
        k = size(model(zeros(Float32, size(x, 1), size(x, 2), size(x, 3), 1)), 1)
        return zeros(Float32, k, 0)
    end
    chunks = Matrix{Float32}[]
    for start in 1:batch_size:n
        stop = min(start + batch_size - 1, n)
        push!(chunks, softmax(model(x[:, :, :, start:stop]); dims=1))
    end
    return reduce(hcat, chunks)
end

# ---------------------------------------------------------------------------------------------
# Files

function read_npz(path::AbstractString, vars, what::AbstractString)
    isfile(path) || throw(InputError(path, "no such $what"))
    d = try
        vars === nothing ? npzread(path) : npzread(path, vars)
    catch e
        e isa InterruptException && rethrow()
        empty = vars === nothing ? nothing : empty_arrays(path, vars)
        empty === nothing && throw(InputError(path, "not a readable .npz file ($(first_line(e)))"))
        empty
    end
    d isa AbstractDict || throw(InputError(path, "a single .npy array, not an .npz archive"))
    return d
end

# ZipFile.jl up to 0.9 throws EOFError reading a zero-length entry, i.e. any empty array (a
# shard whose images were all rejected). If every array asked for is empty, make them from the
# headers; otherwise return nothing and let the read error stand.
function empty_arrays(path::AbstractString, vars)
    isdefined(NPZ, :readheader) || return nothing
    headers = try
        NPZ.readheader(path, vars)
    catch e
        e isa InterruptException && rethrow()
        return nothing
    end
    (headers isa AbstractDict && all(h -> prod(size(h)) == 0, values(headers))) || return nothing
    return Dict{String,Any}(k => Array{eltype(h)}(undef, size(h)) for (k, h) in headers)
end

"""
    read_shard(path, spec=nothing) -> (images, labels, ids)

Read and check a preprocessed shard: `images` Float32 (W, H, C, N) — the spec's (W, H, C) if
one is given —, `labels` and `ids` Int64 of length N, no NaN/Inf. Throws `InputError(path, …)`.
"""
function read_shard(path::AbstractString, spec::Union{ArchSpec,Nothing}=nothing)
    d = read_npz(path, ["images", "labels", "ids"], "shard")
    for name in ("images", "labels", "ids")
        haskey(d, name) || throw(InputError(path, "missing array `$name`"))
    end
    images, labels, ids = d["images"], d["labels"], d["ids"]
    images isa Array{Float32,4} || throw(InputError(path,
        "`images` must be float32 (W, H, C, N), got $(describe(images))"))
    n = size(images, 4)
    for (name, a) in (("labels", labels), ("ids", ids))
        (a isa Vector{Int64} && length(a) == n) || throw(InputError(path,
            "`$name` must be int64 ($n,), got $(describe(a))"))
    end
    if spec !== nothing && size(images)[1:3] != (spec.width, spec.height, spec.channels)
        throw(InputError(path, "images are (W, H, C) = $(size(images)[1:3]) but the weights " *
                               "expect $((spec.width, spec.height, spec.channels))"))
    end
    all(isfinite, images) || throw(InputError(path, "`images` holds NaN or Inf"))
    return (images=images, labels=labels, ids=ids)
end

"""`shard-00003.npz` -> `shard-00003.probs.npz`."""
probs_name(shard::AbstractString) = replace(basename(shard), r"\.npz$" => "") * ".probs.npz"

"""
    write_probs(path, probs, ids)

Write `probs` (K × N, stored so that numpy sees (N, K)) and `ids` atomically.
"""
function write_probs(path::AbstractString, probs::AbstractMatrix{Float32}, ids::AbstractVector)
    size(probs, 2) == length(ids) ||
        throw(ArgumentError("$(size(probs, 2)) probability columns for $(length(ids)) ids"))
    atomic_npzwrite(path, Dict{String,Any}("probs" => permutedims(probs),
                                           "ids" => collect(Int64, ids)))
    return path
end

# Write to a temp file beside `path`, then rename over it: readers never see a half-written
# file, and a failure leaves the previous file intact.
function atomic_npzwrite(path::AbstractString, vars::Dict{String,Any})
    dir = dirname(abspath(path))
    mkpath(dir)
    tmp = joinpath(dir, ".$(basename(path)).$(getpid()).tmp")
    try
        npzwrite(tmp, vars)
        replace_file(tmp, path)
    catch
        rm(tmp; force=true)
        rethrow()
    end
    return path
end

# One rename(2); `mv(…; force=true)` would delete the target first, leaving a moment without it.
function replace_file(src::AbstractString, dst::AbstractString)
    if isdefined(Base.Filesystem, :rename)
        Base.Filesystem.rename(src, dst)
    else
        mv(src, dst; force=true)
    end
end

# ---------------------------------------------------------------------------------------------
# Single images (PNG/JPEG), the seed's use: decoding needs FileIO, loaded only on this path.

const IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
is_image_path(path::AbstractString) = any(ext -> endswith(lowercase(path), ext), IMAGE_EXTENSIONS)

const IMAGE_PACKAGES_HINT = "reading PNG/JPEG needs the Julia packages FileIO, ImageIO and " *
    "ColorTypes; add them to your default environment (julia -e 'using Pkg; " *
    "Pkg.add([\"FileIO\", \"ImageIO\", \"ColorTypes\"])') or run `synthflux preprocess` and " *
    "pass the shard"

"""
    decode_image(path) -> Array{Float32,3}

The image as (3, H, W) RGB values in [0, 1]. Loads FileIO/ColorTypes on first use, so the
shard path never depends on them.
"""
function decode_image(path::AbstractString)
    try
        Core.eval(Main, :(import FileIO, ColorTypes))
    catch e
        e isa InterruptException && rethrow()
        throw(InputError(path, IMAGE_PACKAGES_HINT * " ($(first_line(e)))"))
    end
    fileio, colortypes = getfield(Main, :FileIO), getfield(Main, :ColorTypes)
    img = try
        Base.invokelatest(fileio.load, path)
    catch e
        e isa InterruptException && rethrow()
        throw(InputError(path, "cannot decode image ($(first_line(e))); " * IMAGE_PACKAGES_HINT))
    end
    # invokelatest: the packages were loaded after this code was compiled.
    return Base.invokelatest(rgb_array, colortypes, img)
end

function rgb_array(colortypes::Module, img::AbstractMatrix)
    out = Array{Float32,3}(undef, 3, size(img, 1), size(img, 2))
    for j in axes(img, 2), i in axes(img, 1)
        c = convert(colortypes.RGB{Float32}, img[i, j])  # Gray, RGBA, N0f8 … all convert
        out[1, i, j], out[2, i, j], out[3, i, j] = colortypes.red(c), colortypes.green(c),
            colortypes.blue(c)
    end
    return out
end

"""
    image_to_whcn(rgb, spec; mean=[0.5], std=[0.5]) -> Array{Float32,4}

A (3, H, W) RGB image in [0, 1] as the one-image WHCN batch the model expects: converted to
grayscale (ITU-R 601 luma, as PIL's "L") when the spec has one channel, resized bilinearly to
(W, H) if needed, normalised `(v - mean[c]) / std[c]` as preprocess does.
"""
function image_to_whcn(rgb::AbstractArray{<:Real,3}, spec::ArchSpec;
                       mean::AbstractVector{<:Real}=[0.5], std::AbstractVector{<:Real}=[0.5])
    size(rgb, 1) == 3 || throw(ArgumentError("expected a (3, H, W) RGB array, got $(size(rgb))"))
    spec.channels in (1, 3) || throw(ArgumentError(
        "the weights expect $(spec.channels) channels; an image gives 1 (gray) or 3 (RGB)"))
    for (name, v) in (("mean", mean), ("std", std))
        length(v) in (1, spec.channels) || throw(ArgumentError(
            "--$name needs 1 or $(spec.channels) values, got $(length(v))"))
    end
    all(s -> s > 0, std) || throw(ArgumentError("--std must be > 0, got $(collect(std))"))
    h, w = size(rgb, 2), size(rgb, 3)
    planes = spec.channels == 1 ?
        [Float32.(0.299 .* rgb[1, :, :] .+ 0.587 .* rgb[2, :, :] .+ 0.114 .* rgb[3, :, :])] :
        [Float32.(rgb[c, :, :]) for c in 1:3]
    x = Array{Float32,4}(undef, spec.width, spec.height, spec.channels, 1)
    for (c, plane) in enumerate(planes)  # plane is (H, W); x is (W, H)
        resized = (h, w) == (spec.height, spec.width) ? plane :
            resize_bilinear(plane, spec.height, spec.width)
        m, s = Float32(mean[min(c, end)]), Float32(std[min(c, end)])
        x[:, :, c, 1] .= (permutedims(resized) .- m) ./ s
    end
    return x
end

# Bilinear resampling with pixel centres aligned (no antialiasing): a convenience for
# single-image use; shards made by `synthflux preprocess` are the exact path.
function resize_bilinear(a::AbstractMatrix{<:Real}, rows::Integer, cols::Integer)
    r0, c0 = size(a)
    out = Matrix{Float32}(undef, rows, cols)
    for j in 1:cols, i in 1:rows
        y = clamp((i - 0.5) * r0 / rows + 0.5, 1, r0)
        x = clamp((j - 0.5) * c0 / cols + 0.5, 1, c0)
        y1, x1 = floor(Int, y), floor(Int, x)
        y2, x2 = min(y1 + 1, r0), min(x1 + 1, c0)
        fy, fx = Float32(y - y1), Float32(x - x1)
        top = (1 - fx) * a[y1, x1] + fx * a[y1, x2]
        bottom = (1 - fx) * a[y2, x1] + fx * a[y2, x2]
        out[i, j] = (1 - fy) * top + fy * bottom
    end
    return out
end

# ---------------------------------------------------------------------------------------------
# Command line

const USAGE = """
usage: julia --project=julia julia/flux_model.jl --input DIR_OR_SHARD... --weights W --output DIR
                                                 [--batch-size B] [--seed S]
       julia --project=julia julia/flux_model.jl IMAGE.png --weights W [--mean M...] [--std S...]

Run the synthflux CNN over preprocessed shards (or one PNG/JPEG image).

  --input PATH...    a folder (all shard-*.npz in it, sorted) or one or more shard files
  --weights W        weights.npz; if it does not exist, initialise from --seed for the
                     input's (W, H, C) with 2 classes and write it
  --output DIR       where DIR/<shard>.probs.npz go (probs (N, K) float32, ids int64)
  --batch-size B     images per forward pass (default 64)
  --seed S           seed for new weights (default 0)
  --mean M...        image mode: per-channel normalisation mean (default 0.5)
  --std S...         image mode: per-channel normalisation std (default 0.5)
  -h, --help         show this help

Errors exit with status 1 and one line on stderr: `flux_model: error: <file>: <problem>`.
"""

Base.@kwdef mutable struct Options
    inputs::Vector{String} = String[]
    weights::String = ""
    output::String = ""
    batch_size::Int = 64
    seed::Int = 0
    mean::Vector{Float32} = Float32[0.5]
    std::Vector{Float32} = Float32[0.5]
    positional::Vector{String} = String[]
    help::Bool = false
end

const OPTIONS = ("--input", "--weights", "--output", "--batch-size", "--seed", "--mean",
                 "--std", "--help")
const MULTI_VALUE = ("--input", "--mean", "--std")

function parse_int(opt, text, min)
    v = tryparse(Int, text)
    (v === nothing || v < min) && throw(InputError(opt, "must be an integer >= $min, got \"$text\""))
    return v
end

function parse_floats(opt, values)
    isempty(values) && throw(InputError(opt, "needs at least one value"))
    out = Float32[]
    for text in values
        v = tryparse(Float32, text)
        (v === nothing || !isfinite(v)) && throw(InputError(opt, "not a number: \"$text\""))
        push!(out, v)
    end
    return out
end

"""Parse the command line into `Options`; throws `InputError(option, …)` for bad usage."""
function parse_args(args::AbstractVector{<:AbstractString})
    o = Options()
    i = 1
    while i <= length(args)
        arg = args[i]
        i += 1
        if arg in ("-h", "--help")
            o.help = true
            continue
        elseif !startswith(arg, "--")
            push!(o.positional, arg)
            continue
        end
        opt, inline = occursin('=', arg) ? Tuple(split(arg, '='; limit=2)) : (arg, nothing)
        opt in OPTIONS || throw(InputError(opt, "unknown option (valid: $(join(OPTIONS, ", ")))"))
        values = String[]
        if inline !== nothing
            push!(values, inline)
        else  # take following words up to the next option: one, or all for multi-value ones
            while i <= length(args) && !startswith(args[i], "--") &&
                  (opt in MULTI_VALUE || isempty(values))
                push!(values, args[i])
                i += 1
            end
        end
        isempty(values) && throw(InputError(opt, "needs a value"))
        if opt == "--input"
            append!(o.inputs, values)
        elseif opt == "--weights"
            o.weights = values[1]
        elseif opt == "--output"
            o.output = values[1]
        elseif opt == "--batch-size"
            o.batch_size = parse_int(opt, values[1], 1)
        elseif opt == "--seed"
            o.seed = parse_int(opt, values[1], 0)
        elseif opt == "--mean"
            o.mean = parse_floats(opt, values)
        elseif opt == "--std"
            o.std = parse_floats(opt, values)
        end
    end
    o.help && return o
    isempty(o.weights) && throw(InputError("--weights", "is required"))
    if !isempty(o.positional)
        (length(o.positional) == 1 && isempty(o.inputs) && is_image_path(o.positional[1])) ||
            throw(InputError(o.positional[1], "unexpected argument; pass shards with --input, " *
                                              "or one PNG/JPEG image alone"))
    else
        isempty(o.inputs) && throw(InputError("--input", "is required"))
        isempty(o.output) && throw(InputError("--output", "is required"))
    end
    return o
end

"""Expand `--input` folders to their sorted `shard-*.npz` files; check that every file exists."""
function resolve_inputs(inputs::AbstractVector{<:AbstractString})
    shards = String[]
    for p in inputs
        if isdir(p)
            names = sort!([f for f in readdir(p)
                           if occursin(r"^shard-.*\.npz$", f) && !endswith(f, ".probs.npz")])
            isempty(names) && throw(InputError(p, "no shard-*.npz files in this folder"))
            append!(shards, joinpath.(p, names))
        elseif isfile(p)
            push!(shards, p)
        else
            throw(InputError(p, "no such file or folder"))
        end
    end
    seen = Dict{String,String}()
    for s in shards
        name = probs_name(s)
        haskey(seen, name) && throw(InputError(s, "same output name as $(seen[name]) ($name)"))
        seen[name] = s
    end
    return shards
end

# Load the weights, or create them for the first shard's (W, H, C) if the file doesn't exist.
function weights_for(path::AbstractString, first_shard::AbstractString, seed::Integer, out::IO)
    isfile(path) && return load_weights(path)
    ispath(path) && throw(InputError(path, "exists but is not a file"))
    w, h, c = size(read_shard(first_shard).images)[1:3]
    spec = try
        ArchSpec(w, h, c, 2, 3, [8, 16])
    catch e
        e isa ArgumentError || rethrow()
        throw(InputError(first_shard, "cannot build a model for its images: $(e.msg)"))
    end
    save_weights(path, init_weights(spec; seed=seed))
    println(out, "weights: $path did not exist; initialised from seed $seed for ",
            "(W, H, C) = ($w, $h, $c), 2 classes, and wrote it")
    return load_weights(path)  # what the file holds is what runs
end

fmt_rate(n, seconds) = seconds > 0 ? @sprintf("%.1f", n / seconds) : "inf"

function run_shards(o::Options, out::IO)
    t_start = time()
    shards = resolve_inputs(o.inputs)
    weights = weights_for(o.weights, shards[1], o.seed, out)
    spec = weights.spec
    model = build_model(weights)
    # Compile the forward pass before timing it, so img/s measures the model, not the JIT.
    predict(model, zeros(Float32, spec.width, spec.height, spec.channels, 1))
    mkpath(o.output)
    class_sums = zeros(Float64, spec.n_classes)
    n_total, forward_s = 0, 0.0
    for shard in shards
        data = read_shard(shard, spec)
        t = time()
        probs = try
            predict(model, data.images; batch_size=o.batch_size)
        catch e
            e isa InterruptException && rethrow()
            throw(InputError(shard, "forward pass failed: $(first_line(e))"))
        end
        dt = time() - t
        target = joinpath(o.output, probs_name(shard))
        try
            write_probs(target, probs, data.ids)
        catch e
            e isa InterruptException && rethrow()
            throw(InputError(target, "cannot write: $(first_line(e))"))
        end
        n = length(data.ids)
        println(out, basename(shard), ": ", n, " images, ", fmt_rate(n, dt), " img/s")
        flush(out)  # a driver streams these lines as progress
        class_sums .+= vec(sum(Float64.(probs); dims=2))
        n_total += n
        forward_s += dt
    end
    means = n_total > 0 ? join((@sprintf("%.4f", s / n_total) for s in class_sums), " ") : "-"
    println(out, "summary: $n_total images in $(length(shards)) shards -> $(o.output)")
    println(out, "  mean probability per class (0..$(spec.n_classes - 1)): $means")
    println(out, "  forward pass: ", @sprintf("%.3f", forward_s), " s, ",
            fmt_rate(n_total, forward_s), " img/s; total ", @sprintf("%.2f", time() - t_start),
            " s with reading, writing and compiling")
    flush(out)
    return nothing
end

function run_image(o::Options, out::IO)
    path = o.positional[1]
    isfile(path) || throw(InputError(path, "no such file"))
    rgb = decode_image(path)
    weights = if isfile(o.weights)
        load_weights(o.weights)
    else  # gray if every pixel has R == G == B
        c = all(rgb[1, :, :] .== rgb[2, :, :] .== rgb[3, :, :]) ? 1 : 3
        spec = try
            ArchSpec(size(rgb, 3), size(rgb, 2), c, 2, 3, [8, 16])
        catch e
            e isa ArgumentError || rethrow()
            throw(InputError(path, "cannot build a model for this image: $(e.msg)"))
        end
        save_weights(o.weights, init_weights(spec; seed=o.seed))
        println(out, "weights: $(o.weights) did not exist; initialised from seed $(o.seed) ",
                "for this image's (W, H, C) = ($(spec.width), $(spec.height), $c) and wrote it")
        load_weights(o.weights)
    end
    x = try
        image_to_whcn(rgb, weights.spec; mean=o.mean, std=o.std)
    catch e
        e isa ArgumentError || rethrow()
        throw(InputError(path, e.msg))
    end
    probs = predict(build_model(weights), x)
    println(out, basename(path), ": ", join((@sprintf("%.6f", p) for p in probs[:, 1]), " "))
    return nothing
end

"""
    main(args; out=stdout, err=stderr) -> exit code

The command line (see `USAGE`). Errors are reported as one line on `err`
(`flux_model: error: <file>: <problem>`) with exit code 1; outputs already written stay.
Set `SYNTHFLUX_DEBUG=1` to get the full stack trace as well.
"""
function main(args::AbstractVector{<:AbstractString}; out::IO=stdout, err::IO=stderr)
    try
        o = parse_args(args)
        if o.help
            print(out, USAGE)
        elseif isempty(o.positional)
            run_shards(o, out)
        else
            run_image(o, out)
        end
        return 0
    catch e
        e isa InterruptException && rethrow()
        if !isempty(get(ENV, "SYNTHFLUX_DEBUG", ""))
            showerror(err, e, catch_backtrace())
            println(err)
        end
        what = e isa InputError ? sprint(showerror, e) : "internal error: $(first_line(e))"
        println(err, "flux_model: error: ", first(split(what, '\n')))
        flush(err)
        return 1
    end
end

end # module
