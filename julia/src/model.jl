# The CNN itself: a Flux Chain built from Weights, and the batched forward pass.

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
