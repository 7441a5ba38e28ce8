# Files the classify stage reads and writes: shards in, .probs.npz out, written atomically.

function read_npz(path::AbstractString, vars, what::AbstractString)
    isfile(path) || throw(InputError(path, "no such $what"))
    d = try
        vars === nothing ? npzread(path) : npzread(path, vars)
    catch e
        e isa InterruptException && rethrow()
        pickled(path) && throw(InputError(path, "holds a pickled (numpy object) array; " *
                                          "only float32 and int64 arrays are read"))
        empty = vars === nothing ? nothing : empty_arrays(path, vars)
        empty === nothing && throw(InputError(path, "not a readable .npz file ($(first_line(e)))"))
        empty
    end
    d isa AbstractDict || throw(InputError(path, "a single .npy array, not an .npz archive"))
    return d
end

# np.savez stores each array's .npy header uncompressed: an object array says so there.
pickled(path::AbstractString) = occursin("'descr': '|O'", String(read(path)))

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

function atomic_npzwrite(path::AbstractString, vars::Dict{String,Any})
    return atomic_write(tmp -> npzwrite(tmp, vars), path)
end

# `write_tmp(tmp)` writes the whole file to a temp file beside `path`, then one rename publishes
# it: readers never see a half-written file, and a failure leaves the previous file intact.
function atomic_write(write_tmp::Function, path::AbstractString)
    dir = dirname(abspath(path))
    mkpath(dir)
    tmp = joinpath(dir, ".$(basename(path)).$(getpid()).tmp")
    try
        write_tmp(tmp)
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
