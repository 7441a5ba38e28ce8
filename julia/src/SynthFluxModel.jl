"""
    SynthFluxModel

The synthflux classifier: a small Flux CNN over WHCN image batches, its weights in a
language-neutral `weights.npz`, the shard I/O of the classify stage, and its training
(`train.jl`, docs/training.md). `julia/flux_model.jl` is the command line around
[`main`](@ref); `synthflux.reference` and `synthflux.reference_train` are its PyTorch twins.

Written against Flux's stable API only (Chain, Conv, MaxPool, Dense, relu, softmax, reshape;
for training `Flux.logsoftmax`; the training pass through the Chain, its convolutions
(conv.jl) and AdamW written out, no Flux optimiser), so the same code runs on Julia 1.10 with
Flux 0.14-0.16 and on Julia 1.5 with Flux 0.12.
"""
module SynthFluxModel

using Flux: Flux, Chain, Conv, Dense, MaxPool, relu, softmax
using LinearAlgebra: mul!
using NPZ: NPZ, npzread, npzwrite
using Printf: @printf, @sprintf
using Random: MersenneTwister
using SHA: sha256

export ArchSpec, Weights, InputError, build_model, load_weights, init_weights, save_weights,
    read_shard, predict, write_probs, probs_name, image_to_whcn, unit_hash, TrainSettings, main

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

"""
    source_digest(dir) -> String

SHA-256 over the names and contents of the `.jl` files in `dir`. `SOURCE_DIGEST` is this
module's own, taken when it was compiled: flux_model.jl uses a sysimage's copy of the module
only while julia/src still has it.
"""
source_digest(dir::AbstractString) = bytes2hex(sha256(join(
    (f * "\0" * read(joinpath(dir, f), String) * "\0"
     for f in sort(readdir(dir)) if endswith(f, ".jl")))))
const SOURCE_DIGEST = source_digest(@__DIR__)

include("arch.jl")
include("weights.jl")
include("model.jl")
include("shards.jl")
include("conv.jl")
include("train.jl")
include("images.jl")
include("cli.jl")
include("serve.jl")

end # module
