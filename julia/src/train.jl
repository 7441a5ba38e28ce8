# Training (`flux_model.jl train`): the one hash behind every random choice, the split, the
# shard and image orders, augmentation, a streaming trainer with a hand-written AdamW,
# validation, early stopping, checkpoint and resume. docs/training.md has the rules;
# python/src/synthflux/reference_train.py is the PyTorch twin. Flux's layers hold the arrays;
# the training pass is written out (the convolutions in conv.jl); no Flux optimiser or
# DataLoader, whose APIs differ between 0.12 and 0.16.

const CHECKPOINT_FORMAT = 1
const HISTORY_COLUMNS = ("epoch", "steps", "train_loss", "train_accuracy", "val_loss",
                         "val_accuracy", "seconds", "images_per_s")

# ---------------------------------------------------------------------------------------------
# The hash and the rules built on it

hash_part(x::AbstractString) = String(x)
hash_part(x::Integer) = x isa Bool ? throw(ArgumentError("unit_hash: a Bool part is ambiguous")) :
    string(x)  # decimal, no leading zeros, as Python's str(int)
hash_part(x) = throw(ArgumentError("unit_hash parts must be strings or integers, got $(typeof(x))"))

"""
    unit_hash(parts...) -> UInt64

The first 8 bytes, big-endian, of SHA-256 of the parts joined with ":" (integers in decimal),
as Python's `int.from_bytes(hashlib.sha256(...).digest()[:8], "big")`.
"""
function unit_hash(parts...)
    digest = sha256(Vector{UInt8}(join((hash_part(p) for p in parts), ":")))
    h = zero(UInt64)
    for i in 1:8
        h = (h << 8) | UInt64(digest[i])
    end
    return h
end

"""`(h >> 11) / 2^53`: the hash as a Float64 in [0, 1), exactly as Python computes it."""
unit_float(h::UInt64) = Float64(h >> 11) / 9007199254740992.0

"""Whether image `id` of `source` is a validation image (depends on nothing else)."""
is_validation(seed::Integer, source::AbstractString, id::Integer, fraction::Real) =
    unit_float(unit_hash(seed, "split", source, id)) < fraction

"""The positions of `ids` (a subset of a shard's images) in epoch `epoch`'s image order."""
function image_order(seed::Integer, epoch::Integer, source::AbstractString,
                     ids::AbstractVector{<:Integer})
    keys = [unit_hash(seed, "order", epoch, source, id) for id in ids]
    return sortperm(keys)  # stable: ties (equal ids) keep the shard's order
end

"""
    augmentation(seed, epoch, source, id, flip, shift) -> (flipped, dx, dy)

The flip and the shift (columns, rows) of one training image in one epoch.
"""
function augmentation(seed::Integer, epoch::Integer, source::AbstractString, id::Integer,
                      flip::Bool, shift::Integer)
    h = unit_hash(seed, "augment", epoch, source, id)
    flipped = flip && (h & 1) == 1
    span = UInt64(2 * shift + 1)
    dx = Int((h >> 8) % span) - shift
    dy = Int((h >> 24) % span) - shift
    return (flipped, dx, dy)
end

"""
    augment!(out, img, flipped, dx, dy) -> out

`out[x, y, c] = img[clamp(fx - dx), clamp(y - dy), c]` for one (W, H, C) image, with 0-based
column x, row y and `fx = W-1-x` if flipped (else x); coordinates clamp to the edge.
"""
function augment!(out::AbstractArray{T,3}, img::AbstractArray{T,3}, flipped::Bool,
                  dx::Integer, dy::Integer) where {T}
    w, h, c = size(img)
    size(out) == (w, h, c) || throw(ArgumentError("augment!: $(size(out)) != $(size(img))"))
    @inbounds for ch in 1:c, y in 0:h-1, x in 0:w-1
        fx = flipped ? w - 1 - x : x
        out[x+1, y+1, ch] = img[clamp(fx - dx, 0, w - 1) + 1, clamp(y - dy, 0, h - 1) + 1, ch]
    end
    return out
end

# ---------------------------------------------------------------------------------------------
# Settings and the data

"""The training settings (docs/training.md); the defaults are flux_model.jl's."""
Base.@kwdef struct TrainSettings
    epochs::Int = 10
    batch_size::Int = 32
    lr::Float64 = 1e-3
    beta1::Float64 = 0.9
    beta2::Float64 = 0.999
    eps::Float64 = 1e-8
    weight_decay::Float64 = 0.0
    val_fraction::Float64 = 0.1
    patience::Int = 3
    seed::Int = 0
    flip::Bool = false
    shift::Int = 0
end

"""One shard of a source: its file, its ids, and which of its images are for validation."""
struct ShardInfo
    source::String
    file::String      # the file name, as it enters the shard-order hash
    path::String
    ids::Vector{Int64}
    labels::Vector{Int64}
    validation::BitVector
end

n_train(s::ShardInfo) = count(!, s.validation)
n_val(s::ShardInfo) = count(s.validation)

"""The sorted `shard-*.npz` files of a source folder; `InputError` if there are none."""
function source_shards(dir::AbstractString)
    isdir(dir) || throw(InputError(dir, ispath(dir) ? "is not a folder" : "no such folder"))
    names = sort!([f for f in readdir(dir)
                   if occursin(r"^shard-.*\.npz$", f) && !endswith(f, ".probs.npz")])
    isempty(names) && throw(InputError(dir, "no shard-*.npz files in this folder"))
    return names
end

"""
    scan_sources(sources, spec, settings) -> Vector{ShardInfo}

Read every shard of every `name => folder` once: check it fits `spec` (its (W, H, C), labels in
0..K-1) and split its images. Throws `InputError` naming the file.
"""
function scan_sources(sources::AbstractVector{<:Pair}, spec::ArchSpec, st::TrainSettings)
    shards = ShardInfo[]
    for (name, dir) in sources
        for file in source_shards(dir)
            path = joinpath(dir, file)
            data = read_shard(path, spec)
            check_labels(path, data.labels, data.ids, spec.n_classes)
            val = BitVector([is_validation(st.seed, name, id, st.val_fraction) for id in data.ids])
            push!(shards, ShardInfo(name, file, path, data.ids, data.labels, val))
        end
    end
    mapreduce(n_train, +, shards; init=0) > 0 || throw(InputError("--input",
        "no training images: $(mapreduce(s -> length(s.ids), +, shards; init=0)) images, " *
        "none outside the validation split (--val-fraction $(st.val_fraction))"))
    return shards
end

function check_labels(path, labels, ids, k)
    for (i, l) in enumerate(labels)
        0 <= l < k || throw(InputError(path, "label $l (image id $(ids[i])) is outside " *
                                             "0..$(k - 1): the weights have $k classes"))
    end
end

# Read a shard again during training; it must still be the one scanned.
function reread_shard(s::ShardInfo, spec::ArchSpec)
    data = read_shard(s.path, spec)
    (data.ids == s.ids && data.labels == s.labels) ||
        throw(InputError(s.path, "changed while training (its ids or labels differ)"))
    return data
end

"""Epoch `epoch`'s order of the shards that hold training images."""
function shard_order(shards::AbstractVector{ShardInfo}, seed::Integer, epoch::Integer)
    train = [s for s in shards if n_train(s) > 0]
    keys = [unit_hash(seed, "shard", epoch, s.source, s.file) for s in train]
    return train[sortperm(keys)]
end

# ---------------------------------------------------------------------------------------------
# The model being trained, its parameters, their gradient, AdamW

"""
    pool2x2(x)

2×2 max-pooling with stride 2, trailing odd rows/columns dropped: `MaxPool((2, 2))`'s forward
pass, bit for bit, with its own gradient: to the window's first maximum (x before y), as in
PyTorch. NNlib's `∇maxpool` (0.7 to 0.9) gives it to the first element `≈` the maximum (rtol
√eps), often a near-maximum: with it the golden run drifts from PyTorch by 1e-3 in six steps;
with this, by 1e-7. (Zygote through `maximum(…; dims)` gives the same gradient 4× slower.)
"""
pool2x2(x::AbstractArray{T,4}) where {T} = pool2x2_argmax(x)[1]

# The pooled values and, per window, which of its four elements (1 to 4, x fastest) is the first
# maximum; `isless` orders like `maximum` (NaN the largest, -0.0 below 0.0). Plain `<` picks
# the same element unless the input holds a NaN or a -0.0, and its loop vectorises (5x faster
# here), so `isless` runs only for such inputs.
function pool2x2_argmax(x::AbstractArray{T,4}) where {T}
    plain = !mapreduce(v -> isnan(v) | (iszero(v) & signbit(v)), |, x; init=false)
    return plain ? pool2x2_argmax(x, <) : pool2x2_argmax(x, isless)
end

function pool2x2_argmax(x::AbstractArray{T,4}, before) where {T}
    w2, h2, c, n = size(x, 1) ÷ 2, size(x, 2) ÷ 2, size(x, 3), size(x, 4)
    y = Array{T}(undef, w2, h2, c, n)
    which = Array{UInt8}(undef, w2, h2, c, n)
    @inbounds for l in 1:n, k in 1:c, j in 1:h2, i in 1:w2
        best, at = x[2i-1, 2j-1, k, l], 0x01
        v = x[2i, 2j-1, k, l]
        up = before(best, v); best, at = ifelse(up, v, best), ifelse(up, 0x02, at)
        v = x[2i-1, 2j, k, l]
        up = before(best, v); best, at = ifelse(up, v, best), ifelse(up, 0x03, at)
        v = x[2i, 2j, k, l]
        up = before(best, v); best, at = ifelse(up, v, best), ifelse(up, 0x04, at)
        y[i, j, k, l], which[i, j, k, l] = best, at
    end
    return y, which
end

pool2x2_gradient(dy, which::Array{UInt8,4}, x::AbstractArray{T,4}) where {T} =
    pool2x2_gradient!(Array{T}(undef, size(x)), dy, which)

function pool2x2_gradient!(dx::AbstractArray{T,4}, dy, which::Array{UInt8,4}) where {T}
    fill!(dx, zero(T))
    @inbounds for l in axes(which, 4), k in axes(which, 3), j in axes(which, 2), i in axes(which, 1)
        at = which[i, j, k, l] - 0x01
        dx[2i-1+(at & 0x01), 2j-1+(at >> 1), k, l] = dy[i, j, k, l]
    end
    return dx
end

"""
    train_model(w::Weights) -> Chain

`build_model`'s Chain on copies of `w`'s arrays (training changes them in place), with
[`pool2x2`](@ref) for each `MaxPool`: the same layers at the same positions, the same logits.
"""
function train_model(w::Weights)
    copies = Weights(w.spec, Dict{String,Array{Float32}}(k => copy(a) for (k, a) in w.arrays))
    return Chain(map(l -> l isa MaxPool ? pool2x2 : l, build_model(copies).layers)...)
end

"""(name, layer index in the Chain, field) for every array, in `expected_shapes` order."""
function param_slots(spec::ArchSpec)
    n = length(spec.block_channels)
    slots = Tuple{String,Int,Symbol}[]
    for i in 1:n  # build_model's Chain: conv, pool per block, then flatten, dense
        push!(slots, ("conv$(i)_weight", 2i - 1, :weight), ("conv$(i)_bias", 2i - 1, :bias))
    end
    push!(slots, ("dense_weight", 2n + 2, :weight), ("dense_bias", 2n + 2, :bias))
    return slots
end

param_array(model, slot) = getproperty(model.layers[slot[2]], slot[3])

"""The gradient of one array from Zygote's nested NamedTuple, or `nothing` (all zero)."""
function grad_array(g, slot)
    g === nothing && return nothing
    layers = getproperty(g, :layers)
    layers === nothing && return nothing
    lg = layers[slot[2]]
    lg === nothing && return nothing
    return getproperty(lg, slot[3])
end

"""Copies of the model's arrays by name."""
snapshot(model, slots) = Dict{String,Array{Float32}}(s[1] => copy(param_array(model, s)) for s in slots)

"""K × N one-hot matrix of 0-based `labels`."""
function onehot_matrix(::Type{T}, labels::AbstractVector{<:Integer}, k::Integer) where {T}
    y = zeros(T, k, length(labels))
    for (j, l) in enumerate(labels)
        y[l+1, j] = one(T)
    end
    return y
end

"""
    loss_and_gradient(model, x, labels, k; buffers) -> (logits, loss, grad)

The batch's logits, its mean cross-entropy (`Flux.logitcrossentropy`'s) and the explicit
gradient with respect to `model`, a nested NamedTuple as `Flux.gradient` gives
(`grad.layers[i].weight`). The pass is written out layer by layer, forward and backward, with
the activations as (W, H, N, C) so that each convolution is one gemm for the whole batch
(conv.jl): the same numbers as Zygote's through the Chain up to rounding (runtests.jl checks
both against finite differences and each other), without compiling Zygote's pullback (most of
a minute on Julia 1.5) and without the gradient with respect to the images, which nothing uses.
`buffers` (one `Buffers` per layer) are reused by the next call that gets them: the
activations and gradients in them are overwritten then; logits and grad never are.
"""
function loss_and_gradient(model, x::AbstractArray{T,4}, labels, k::Integer;
                           buffers=layer_buffers(model)) where {T}
    layers = model.layers
    inputs, saved = Vector{Any}(undef, length(layers)), Vector{Any}(undef, length(layers))
    a = permutedims(x, (1, 2, 4, 3))  # WHCN -> (W, H, N, C)
    for (i, layer) in enumerate(layers)
        inputs[i] = a
        a, saved[i] = forward(layer, a, buffers[i])
    end
    logits, n = a, size(a, 2)
    y = onehot_matrix(T, labels, k)
    lsm = Flux.logsoftmax(logits; dims=1)
    loss = -sum(y .* lsm) / n
    delta = (exp.(lsm) .- y) ./ n  # d loss / d logits
    grads = Vector{Any}(nothing, length(layers))
    for i in length(layers):-1:1
        grads[i], delta = backward(layers[i], inputs[i], saved[i], delta, i > 1, buffers[i])
    end
    return logits, loss, (layers=Tuple(grads),)
end

# forward(layer, x, buf) -> (output, what its backward needs);
# backward(layer, x, saved, delta, input_grad, buf) -> (its arrays' gradient or nothing, the
# gradient of its input, or nothing when `input_grad` is false). buf: the layer's Buffers.
# Conv's are in conv.jl.
forward(d::Dense, x, _) = (d.σ === identity || error("Dense with an activation"); (d(x), nothing))
forward(::typeof(pool2x2), x, _) = pool2x2_argmax(x)
# Back to WHCN first: the Dense layer's features are in flatten_whcn's order.
forward(::typeof(flatten_whcn), x, _) = (flatten_whcn(permutedims(x, (1, 2, 4, 3))), nothing)

function backward(d::Dense, x, _, delta, input_grad::Bool, _)
    dx = input_grad ? d.weight' * delta : nothing
    return (weight=delta * x', bias=vec(sum(delta; dims=2))), dx
end

backward(::typeof(pool2x2), x, which, delta, _, buf) =
    nothing, pool2x2_gradient!(buffer(buf, :dx, eltype(x), size(x)), delta, which)
function backward(::typeof(flatten_whcn), x, _, delta, _, _)
    w, h, n, c = size(x)
    return nothing, permutedims(reshape(delta, w, h, c, n), (1, 2, 4, 3))
end

"""Per-example cross-entropy (Float64) and right predictions of K × N logits."""
function example_stats(logits::AbstractMatrix, labels)
    lsm = Flux.logsoftmax(logits; dims=1)
    loss_sum, right = 0.0, 0
    for j in 1:size(logits, 2)
        loss_sum += -Float64(lsm[labels[j]+1, j])
        right += argmax(view(logits, :, j)) == labels[j] + 1
    end
    return loss_sum, right
end

"""AdamW's scalars for step `t`: each computed in Float64 from the settings, rounded once."""
function adamw_scalars(st::TrainSettings, t::Integer)
    b1, b2 = st.beta1, st.beta2
    return (b1=Float32(b1), c1=Float32(1 - b1), b2=Float32(b2), c2=Float32(1 - b2),
            a=Float32(st.lr / (1 - b1^t)), s=Float32(sqrt(1 - b2^t)), e=Float32(st.eps),
            d=Float32(1 - st.lr * st.weight_decay), decay=st.weight_decay > 0)
end

"""
    adamw_update!(p, g, m, v, k)

One AdamW step in place, elementwise in Float32 (docs/training.md); `g === nothing` is zero.
"""
function adamw_update!(p::AbstractArray{Float32}, g, m::AbstractArray{Float32},
                       v::AbstractArray{Float32}, k)
    size(p) == size(m) == size(v) || throw(ArgumentError("adamw_update!: sizes differ"))
    g === nothing || size(g) == size(p) ||
        throw(ArgumentError("adamw_update!: gradient $(size(g)) for an array $(size(p))"))
    @inbounds for i in eachindex(p, m, v)
        gi = g === nothing ? 0.0f0 : Float32(g[i])
        mi = k.b1 * m[i] + k.c1 * gi
        vi = k.b2 * v[i] + k.c2 * (gi * gi)
        q = p[i]
        if k.decay
            q = q * k.d
        end
        q = q - k.a * mi / (sqrt(vi) / k.s + k.e)
        m[i], v[i], p[i] = mi, vi, q
    end
    return p
end

# ---------------------------------------------------------------------------------------------
# The state a checkpoint holds

"""Everything a checkpoint holds besides the model's current arrays."""
mutable struct TrainState
    m::Dict{String,Array{Float32}}
    v::Dict{String,Array{Float32}}
    best::Dict{String,Array{Float32}}
    epoch::Int
    step::Int
    best_epoch::Int
    bad_epochs::Int
    finished::Bool
    best_val_loss::Float64
    history::Matrix{Float64}  # epochs × 8, HISTORY_COLUMNS
end

function fresh_state(model, slots)
    zero_like() = Dict{String,Array{Float32}}(s[1] => zeros(Float32, size(param_array(model, s)))
                                              for s in slots)
    return TrainState(zero_like(), zero_like(), snapshot(model, slots), 0, 0, 0, 0, false, NaN,
                      zeros(Float64, 0, length(HISTORY_COLUMNS)))
end

"""
    next_best(best_epoch, best_val_loss, epoch, val_loss, has_val) -> (best_epoch, best_val_loss)

The best epoch after `epoch`: the lowest `val_loss` (the first on ties, NaN never better than a
number), or, without validation images, the last epoch.
"""
function next_best(best_epoch, best_val_loss, epoch, val_loss, has_val)
    has_val || return (epoch, NaN)
    (best_epoch == 0 || isless(val_loss, best_val_loss)) && return (epoch, val_loss)
    return (best_epoch, best_val_loss)
end

"""The best epoch after each row of a history (what `metrics.jsonl` says)."""
function best_epochs(history::AbstractMatrix)
    out, best, loss = Int[], 0, NaN
    for r in 1:size(history, 1)
        best, loss = next_best(best, loss, Int(history[r, 1]), history[r, 5], !isnan(history[r, 6]))
        push!(out, best)
    end
    return out
end

stop_now(state::TrainState, st::TrainSettings) =
    state.epoch >= st.epochs || (st.patience > 0 && state.bad_epochs >= st.patience)

function write_checkpoint(path, spec::ArchSpec, model, slots, state::TrainState)
    vars = Dict{String,Any}("arch" => arch_vector(spec))
    for s in slots
        name = s[1]
        vars[name] = copy(param_array(model, s))
        vars["m_" * name] = state.m[name]
        vars["v_" * name] = state.v[name]
        vars["best_" * name] = state.best[name]
    end
    vars["state"] = Int64[CHECKPOINT_FORMAT, state.epoch, state.step, state.best_epoch,
                          state.bad_epochs, state.finished]
    vars["best_val_loss"] = Float64[state.best_val_loss]
    vars["history"] = state.history
    atomic_npzwrite(path, vars)
    return path
end

"""
    read_checkpoint(path, spec) -> (arrays, state)

A checkpoint for `spec`'s network: its current arrays and the `TrainState`. Throws
`InputError(path, …)` if it is unreadable or made for another network.
"""
function read_checkpoint(path::AbstractString, spec::ArchSpec)
    # `history` apart: with no epoch (--epochs 0) it is empty, which ZipFile.jl <= 0.9 reads
    # only alone (see `empty_arrays`).
    names = ["arch", "state", "best_val_loss"]
    for prefix in ("", "m_", "v_", "best_"), (name, _) in expected_shapes(spec)
        push!(names, prefix * name)
    end
    d = read_npz(path, names, "checkpoint")
    hist = get(read_npz(path, ["history"], "checkpoint"), "history", nothing)
    bad(msg) = throw(InputError(path, msg * " (delete it, or the output folder, to start over)"))
    arch = get(d, "arch", nothing)
    (arch isa AbstractVector{<:Integer} && collect(Int64, arch) == arch_vector(spec)) ||
        bad("made for another network than --weights (its `arch` differs)")
    shapes = Dict(expected_shapes(spec))
    arrays(prefix) = Dict{String,Array{Float32}}(begin
        a = get(d, prefix * name, nothing)
        (a isa AbstractArray{Float32} && size(a) == shape) ||
            bad("`$(prefix)$(name)` is missing or not float32 $shape")
        name => Array{Float32}(a)
    end for (name, shape) in shapes)
    current, m, v, best = arrays(""), arrays("m_"), arrays("v_"), arrays("best_")
    st, bvl = get(d, "state", nothing), get(d, "best_val_loss", nothing)
    (st isa AbstractVector{Int64} && length(st) == 6 && st[1] == CHECKPOINT_FORMAT) ||
        bad("`state` must be int64 [$CHECKPOINT_FORMAT, epoch, step, best_epoch, bad_epochs, finished]")
    (bvl isa AbstractVector{Float64} && length(bvl) == 1) || bad("`best_val_loss` must be float64 (1,)")
    (hist isa AbstractMatrix{Float64} && size(hist) == (st[2], length(HISTORY_COLUMNS))) ||
        bad("`history` must be float64 ($(st[2]), $(length(HISTORY_COLUMNS)))")
    state = TrainState(m, v, best, st[2], st[3], st[4], st[5], st[6] != 0, bvl[1], Matrix{Float64}(hist))
    return current, state
end

# ---------------------------------------------------------------------------------------------
# metrics: stdout and metrics.jsonl

json_number(x::Integer) = string(x)
json_number(x::Real) = isfinite(x) ? @sprintf("%.9g", x) : "null"

"""One `{"epoch": …}` object for a history row."""
function metrics_json(row::AbstractVector{Float64}, best_epoch::Integer)
    r = Dict(zip(HISTORY_COLUMNS, row))
    fields = ("epoch" => Int(r["epoch"]), "steps" => Int(r["steps"]),
              "train_loss" => r["train_loss"], "train_accuracy" => r["train_accuracy"],
              "val_loss" => r["val_loss"], "val_accuracy" => r["val_accuracy"],
              "images_per_s" => r["images_per_s"], "seconds" => r["seconds"],
              "best_epoch" => Int(best_epoch))
    return "{" * join(("\"$k\": $(json_number(v))" for (k, v) in fields), ", ") * "}"
end

"""Rewrite `metrics.jsonl` (one object a line, one line per epoch) atomically."""
function write_metrics(path::AbstractString, history::AbstractMatrix{Float64})
    best = best_epochs(history)
    text = join((metrics_json(history[r, :], best[r]) * "\n" for r in 1:size(history, 1)))
    return atomic_write(tmp -> write(tmp, text), path)
end

# ---------------------------------------------------------------------------------------------
# The trainer

"""What one training run needs besides its state."""
struct TrainJob
    spec::ArchSpec
    settings::TrainSettings
    shards::Vector{ShardInfo}
    output::String
end

checkpoint_path(dir) = joinpath(dir, "checkpoint.npz")
metrics_path(dir) = joinpath(dir, "metrics.jsonl")
result_path(dir) = joinpath(dir, "weights.npz")

"""
One AdamW step on a batch; returns (sum of the per-example losses, right predictions, the
batch's mean loss), all from the forward pass before the update. `buffers`: loss_and_gradient's.
"""
function train_step!(model, slots, state::TrainState, job::TrainJob, x, labels;
                     buffers=layer_buffers(model))
    logits, loss, grad = loss_and_gradient(model, x, labels, job.spec.n_classes; buffers=buffers)
    loss_sum, right = example_stats(logits, labels)
    state.step += 1
    k = adamw_scalars(job.settings, state.step)
    for s in slots
        adamw_update!(param_array(model, s), grad_array(grad, s), state.m[s[1]], state.v[s[1]], k)
    end
    return loss_sum, right, loss
end

"""
    train_epoch!(model, slots, state, job, out; hook=nothing) -> (loss_sum, right, n, seconds)

One epoch over the training images: shards in the epoch's order, images in theirs, augmented,
in batches that may span shards. Prints `progress: STEP/STEPS` about 10 times. `hook(epoch,
step, loss)` runs after each step with the batch's mean loss (tests use it to see the losses
and to interrupt a run). `seconds` is the training loop's time, validation not included.
"""
function train_epoch!(model, slots, state::TrainState, job::TrainJob, out::IO; hook=nothing)
    st, spec = job.settings, job.spec
    epoch = state.epoch + 1
    total = cld(mapreduce(n_train, +, job.shards; init=0), st.batch_size)
    x = Array{Float32}(undef, spec.width, spec.height, spec.channels, st.batch_size)
    labels = Vector{Int64}(undef, st.batch_size)
    filled, done, loss_sum, right, n = 0, 0, 0.0, 0, 0
    buffers = layer_buffers(model)
    t0 = time()
    function step!(xb, lb)
        l, r, batch_loss = train_step!(model, slots, state, job, xb, lb; buffers=buffers)
        loss_sum += l
        right += r
        n += length(lb)
        done += 1
        if done == total || div(10 * done, total) != div(10 * (done - 1), total)
            println(out, "progress: $done/$total")
            flush(out)
        end
        hook === nothing || hook(epoch, done, batch_loss)
    end
    for shard in shard_order(job.shards, st.seed, epoch)
        data = reread_shard(shard, spec)
        train_idx = findall(!, shard.validation)
        for j in train_idx[image_order(st.seed, epoch, shard.source, shard.ids[train_idx])]
            filled += 1
            flipped, dx, dy = augmentation(st.seed, epoch, shard.source, shard.ids[j], st.flip, st.shift)
            augment!(view(x, :, :, :, filled), view(data.images, :, :, :, j), flipped, dx, dy)
            labels[filled] = data.labels[j]
            if filled == st.batch_size
                step!(x, labels)
                filled = 0
            end
        end
    end
    filled > 0 && step!(x[:, :, :, 1:filled], labels[1:filled])
    return loss_sum, right, n, time() - t0
end

"""Mean cross-entropy and accuracy over the validation images (NaN, NaN without any)."""
function validate(model, job::TrainJob)
    loss_sum, right, n = 0.0, 0, 0
    for shard in job.shards
        n_val(shard) == 0 && continue
        data = reread_shard(shard, job.spec)
        idx = findall(shard.validation)
        for start in 1:job.settings.batch_size:length(idx)
            sel = idx[start:min(start + job.settings.batch_size - 1, end)]
            l, r = example_stats(model(data.images[:, :, :, sel]), data.labels[sel])
            loss_sum += l
            right += r
            n += length(sel)
        end
    end
    return n == 0 ? (NaN, NaN) : (loss_sum / n, right / n)
end

function write_result(job::TrainJob, state::TrainState)
    path = result_path(job.output)
    all(a -> all(isfinite, a), values(state.best)) || throw(InputError(path,
        "not written: the best weights (epoch $(state.best_epoch)) hold NaN or Inf; " *
        "training diverged, try a smaller --lr"))
    save_weights(path, Weights(job.spec, state.best))
    write_metrics(metrics_path(job.output), state.history)
    return path
end

"""
    train(job, init::Weights, out; hook=nothing) -> TrainState

Train from `init`, or go on from `job.output`'s checkpoint if there is one; writes the
checkpoint and `metrics.jsonl` after every epoch, `weights.npz` (the best epoch's) at the end.
"""
function train(job::TrainJob, init::Weights, out::IO; hook=nothing)
    spec, st = job.spec, job.settings
    slots = param_slots(spec)
    ckpt = checkpoint_path(job.output)
    if isfile(ckpt)
        current, state = read_checkpoint(ckpt, spec)
        state.epoch > st.epochs && throw(InputError(ckpt, "is at epoch $(state.epoch), past " *
            "--epochs $(st.epochs) (delete it, or the output folder, to start over)"))
        model = train_model(Weights(spec, current))
        println(out, "resume: from epoch $(state.epoch)")
        flush(out)
    else
        model = train_model(init)
        state = fresh_state(model, slots)
    end
    if stop_now(state, st)  # finished (or --epochs 0): the outputs again, nothing to train
        if !(isfile(ckpt) && state.finished)
            state.finished = true
            write_checkpoint(ckpt, spec, model, slots, state)
        end
        write_result(job, state)
        print_done(out, job, state)
        return state
    end
    warm_up(model, slots, job, state)
    while !stop_now(state, st)
        loss_sum, right, n, seconds = train_epoch!(model, slots, state, job, out; hook=hook)
        val_loss, val_acc = validate(model, job)
        state.epoch += 1
        best_epoch, state.best_val_loss = next_best(state.best_epoch, state.best_val_loss,
                                                    state.epoch, val_loss, !isnan(val_acc))
        if best_epoch == state.epoch
            state.best = snapshot(model, slots)
        end
        state.best_epoch = best_epoch
        state.bad_epochs = state.epoch - best_epoch
        row = [state.epoch, state.step, loss_sum / n, right / n, val_loss, val_acc, seconds,
               seconds > 0 ? n / seconds : Inf]
        state.history = vcat(state.history, permutedims(row))
        state.finished = stop_now(state, st)
        write_checkpoint(ckpt, spec, model, slots, state)
        write_metrics(metrics_path(job.output), state.history)
        println(out, "metrics: ", metrics_json(row, state.best_epoch))
        flush(out)
    end
    write_result(job, state)
    print_done(out, job, state)
    return state
end

# Compile a step's code on a blank image, on copies of the model and the state, so that the
# first epoch's seconds and images/s measure training, not the JIT.
function warm_up(model, slots, job::TrainJob, state::TrainState)
    spec, st = job.spec, job.settings
    x = zeros(Float32, spec.width, spec.height, spec.channels, 1)
    train_step!(deepcopy(model), slots, deepcopy(state), job, x, [0])
    augment!(view(similar(x), :, :, :, 1), view(x, :, :, :, 1), true, 1, 1)
    image_order(st.seed, 1, "", Int64[0])
    augmentation(st.seed, 1, "", Int64(0), st.flip, st.shift)
    shard_order(job.shards[1:0], st.seed, 1)
    return nothing
end

function print_done(out::IO, job::TrainJob, state::TrainState)
    epochs(n) = n == 1 ? "1 epoch" : "$n epochs"
    why = state.epoch >= job.settings.epochs ? "after $(epochs(state.epoch))" :
        "early after epoch $(state.epoch) ($(epochs(state.bad_epochs)) without a better val_loss)"
    println(out, "done: stopped $why; best epoch $(state.best_epoch) -> ",
            result_path(job.output))
    flush(out)
end
