# The network's shape: ArchSpec, its `arch` vector in weights.npz, and the default CNN.

const FORMAT_VERSION = 1
const ARCH_HEADER = 7  # format_version, W, H, C, K, kernel, n_blocks; then one entry per block
# The default CNN, here once for Julia (python/src/synthflux/weights.py has Python's; a test
# checks that both say the same).
const DEFAULT_KERNEL = 3
const DEFAULT_BLOCKS = [8, 16]
const DEFAULT_CLASSES = 2  # when flux_model.jl must create weights without knowing the classes

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

"""The default CNN for (W, H, C) inputs; `ArgumentError` if they are too small for it."""
default_spec(width, height, channels) =
    ArchSpec(width, height, channels, DEFAULT_CLASSES, DEFAULT_KERNEL, DEFAULT_BLOCKS)
