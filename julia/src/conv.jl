# The training pass's convolutions: the whole batch as one patch matrix and one gemm.
#
# NNlib 0.7 (Flux 0.12) builds a patch (im2col) matrix and calls gemm once per image; for this
# network's small images those small calls were most of a training step (~8 of 9 ms for 32
# images of 28×28). The training pass keeps its activations as (W, H, N, C) instead of WHCN:
# then the whole batch's patches are one matrix, (W·H·N) × (k·k·C), each of its columns a
# shifted copy of the input, and a convolution is one gemm, its filter gradient another, its
# input gradient a third plus the shifted copies added back. Flux's `Conv` stays the holder of
# the arrays and the layer of inference (`predict`, validation). The big arrays of a step (the
# patch matrices, the gemms' outputs) go into `Buffers` that the next step reuses: a fresh
# 2 MB array cost more in page faults than filling it (patches 0.5 ms fresh, 0.2 ms reused).

"""Arrays a layer reuses from one training step to the next, by name."""
const Buffers = Dict{Symbol,Array}

"""One empty `Buffers` per layer of `model`: what `loss_and_gradient` fills and reuses."""
layer_buffers(model) = [Buffers() for _ in model.layers]

# buf[name] if it has the type and size asked for, else a new array there (uninitialised).
function buffer(buf::Buffers, name::Symbol, ::Type{T}, dims::Dims{N}) where {T,N}
    a = get(buf, name, nothing)
    fits = a isa Array{T,N} && size(a) == dims
    return (fits ? a : (buf[name] = Array{T,N}(undef, dims)))::Array{T,N}  # inferred
end

# The patch matrix's size for an input of size (W, H, N, C): (W·H·N) × (k·k·C).
patch_size((W, H, N, C)::NTuple{4,Int}, k::Integer) = (W * H * N, k * k * C)

"""
    patches(x, k) -> Matrix
    patches!(cols, x, k) -> cols

The k×k patches of `x` (W, H, N, C), padded by k÷2 with zeros, stride 1: the element in row
(w, h, n) and column (i, j, c) (first index fastest in both) is `x[w+i-1-k÷2, h+j-1-k÷2, n, c]`.
"""
patches(x::Array{T,4}, k::Integer) where {T} =
    patches!(Matrix{T}(undef, patch_size(size(x), k)), x, k)

function patches!(cols::Matrix{T}, x::Array{T,4}, k::Integer) where {T}
    W = size(x, 1)
    size(cols) == patch_size(size(x), k) || error("patches!: wrong size")
    each_run(size(x), k) do dst, src, w1, w2
        @inbounds begin
            for w in 1:w1-1
                cols[dst+w] = zero(T)
            end
            @simd for w in w1:w2
                cols[dst+w] = x[src+w]
            end
            for w in max(w1, w2 + 1):W
                cols[dst+w] = zero(T)
            end
        end
    end
    return cols
end

"""
    add_patches(dcols, dims, k) -> Array
    add_patches!(dx, dcols, k) -> dx

The adjoint of [`patches`](@ref): an array of size `dims` (W, H, N, C) in which each element of
`x` receives the sum of the entries of `dcols` that `patches(x, k)` copied it to.
"""
add_patches(dcols::Matrix{T}, dims::NTuple{4,Int}, k::Integer) where {T} =
    add_patches!(Array{T,4}(undef, dims), dcols, k)

function add_patches!(dx::Array{T,4}, dcols::Matrix{T}, k::Integer) where {T}
    size(dcols) == patch_size(size(dx), k) || error("add_patches!: wrong size")
    fill!(dx, zero(T))
    each_run(size(dx), k) do dst, src, w1, w2
        @inbounds @simd for w in w1:w2
            dx[src+w] += dcols[dst+w]
        end
    end
    return dx
end

# The patch matrix as runs of W elements, one per column (i, j, c) and (n, h): f(dst, src, w1,
# w2) for each, where cols[dst + w] is x[src + w] for w in w1:w2 (an empty range when the run's
# row h+j-1-k÷2 is outside the image) and padding for the other w in 1:W. Linear indices:
# Julia's 6-index arithmetic made the copy 4× slower.
@inline function each_run(f, (W, H, N, C)::NTuple{4,Int}, k::Integer)
    p, col = k ÷ 2, 0
    for c in 1:C, j in 1:k, i in 1:k
        dx, dy = i - 1 - p, j - 1 - p
        w1 = clamp(1 - dx, 1, W + 1)
        w2 = clamp(W - dx, w1 - 1, W)
        for n in 1:N, h in 1:H
            dst = ((col * N + n - 1) * H + h - 1) * W
            if 1 <= h + dy <= H
                f(dst, (((c - 1) * N + n - 1) * H + h + dy - 1) * W + dx, w1, w2)
            else
                f(dst, 0, 1, 0)
            end
        end
        col += 1
    end
end

# Flux's Conv convolves (NNlib's default, the kernel flipped); the patches are correlated, so
# the gemm takes the kernel flipped back, as a (k·k·C) × C' matrix.
kernel_matrix(weight::AbstractArray{T,4}) where {T} =
    reshape(weight[end:-1:1, end:-1:1, :, :], :, size(weight, 4))

function check_conv(c::Conv)
    k = size(c.weight, 1)
    ok = c.σ === relu && size(c.weight, 2) == k && isodd(k) && all(==(1), c.stride) &&
        all(==(1), c.dilation) && all(==(k ÷ 2), c.pad)
    ok || error("training expects build_model's Conv layers: relu, stride 1, padding k÷2")
    return k
end

# forward(c, x, buf) -> (y, what backward needs): y = relu(conv(x) + bias), x and y (W, H, N, C).
function forward(c::Conv, x::Array{T,4}, buf::Buffers=Buffers()) where {T}
    k = check_conv(c)
    cols = patches!(buffer(buf, :cols, T, patch_size(size(x), k)), x, k)
    y = mul!(buffer(buf, :y, T, (size(cols, 1), size(c.weight, 4))), cols, kernel_matrix(c.weight))
    b = c.bias
    @inbounds for o in axes(y, 2)
        bo = b[o]
        @simd for r in axes(y, 1)
            y[r, o] = relu(y[r, o] + bo)
        end
    end
    return reshape(y, size(x, 1), size(x, 2), size(x, 3), :), (y, cols)
end

function backward(c::Conv, x, saved, delta, input_grad::Bool, buf::Buffers=Buffers())
    y, cols = saved
    T = eltype(y)
    # relu'(z), from relu(z) > 0 <=> z > 0 (PyTorch's rule at 0)
    dz = buffer(buf, :dz, T, size(y)) .= reshape(delta, size(y)) .* (y .> 0)
    dk = reshape(cols' * dz, size(c.weight))
    dw = dk[end:-1:1, end:-1:1, :, :]
    dx = nothing
    if input_grad
        dcols = mul!(buffer(buf, :dcols, T, size(cols)), dz, kernel_matrix(c.weight)')
        dx = add_patches!(buffer(buf, :dx, T, size(x)), dcols, size(dk, 1))
    end
    return (weight=dw, bias=vec(sum(dz; dims=1))), dx
end
