# The command line of julia/flux_model.jl: options, the shard, image and train modes, @PATH
# response files, `main`.

const USAGE = """
usage: julia --project=julia julia/flux_model.jl --input DIR_OR_SHARD... --weights W --output DIR
                                                 [--batch-size B] [--seed S]
       julia --project=julia julia/flux_model.jl IMAGE.png --weights W [--mean M...] [--std S...]
       julia --project=julia julia/flux_model.jl train --input NAME=DIR... --weights INIT.npz
                                                 --output DIR [training options]
       julia --project=julia julia/flux_model.jl serve    (jobs on stdin, one a line)

Run the synthflux CNN over preprocessed shards (or one PNG/JPEG image), or train it (`train`).

  --input PATH...    a folder (all shard-*.npz in it, sorted) or one or more shard files
  --weights W        weights.npz; if it does not exist, initialise from --seed for the
                     input's (W, H, C) with 2 classes and write it
  --output DIR       where DIR/<shard>.probs.npz go (probs (N, K) float32, ids int64)
  --batch-size B     images per forward pass (default 64)
  --seed S           seed for new weights (default 0)
  --mean M...        image mode: per-channel normalisation mean (default 0.5)
  --std S...         image mode: per-channel normalisation std (default 0.5)
  -h, --help         show this help

Training (`train` first; the rules are docs/training.md's):
  --input NAME=DIR...   each training source: its name (it enters every hash) and its folder
                        of shard-*.npz
  --weights INIT.npz    the initial weights (never changed)
  --output DIR          checkpoint.npz (every epoch; a rerun goes on from it), metrics.jsonl,
                        and at the end weights.npz (the best epoch's)
  --epochs E (10)  --batch-size B (32)  --lr X (1e-3)  --beta1 X (0.9)  --beta2 X (0.999)
  --eps X (1e-8)  --weight-decay X (0, decoupled)  --val-fraction X (0.1)
  --patience P (3; 0: never stop early)  --seed S (0)  --flip 0|1 (0)  --shift N (0)
  stdout: `progress: STEP/STEPS` lines, one `metrics: {...}` line per epoch, `done: ...`

`serve` reads jobs from stdin, one a line: the arguments of one of the commands above,
separated by tabs. Each job's output is followed by `flux_model serve: job N exit C`.

An argument @PATH stands for the lines of PATH, one argument a line (empty lines ignored).
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

"""
    split_options(args, valid, multi_value; command="", positional=nothing) -> (help, options)

The words of a command line as (option, values) in order: `--opt=v`, or `--opt` and the words
after it up to the next option (one, or all for `multi_value` ones). `-h`/`--help` sets `help`;
other words go to `positional`, or are an error where it is `nothing`.
"""
function split_options(args::AbstractVector{<:AbstractString}, valid, multi_value;
                       command::AbstractString="", positional=nothing)
    help, options = false, Pair{String,Vector{String}}[]
    i = 1
    while i <= length(args)
        arg = args[i]
        i += 1
        if arg in ("-h", "--help")
            help = true
            continue
        elseif !startswith(arg, "--")
            positional === nothing &&
                throw(InputError(arg, "unexpected argument ($command takes options only)"))
            push!(positional, arg)
            continue
        end
        opt, inline = occursin('=', arg) ? Tuple(split(arg, '='; limit=2)) : (arg, nothing)
        suffix = isempty(command) ? "" : " for $command"
        opt in valid || throw(InputError(opt, "unknown option$suffix (valid: $(join(valid, ", ")))"))
        values = String[]
        if inline !== nothing
            push!(values, inline)
        else
            while i <= length(args) && !startswith(args[i], "--") &&
                  (opt in multi_value || isempty(values))
                push!(values, args[i])
                i += 1
            end
        end
        isempty(values) && throw(InputError(opt, "needs a value"))
        push!(options, String(opt) => values)
    end
    return help, options
end

"""Parse the command line into `Options`; throws `InputError(option, …)` for bad usage."""
function parse_args(args::AbstractVector{<:AbstractString})
    o = Options()
    o.help, options = split_options(args, OPTIONS, MULTI_VALUE; positional=o.positional)
    for (opt, values) in options
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
        default_spec(w, h, c)
    catch e
        e isa ArgumentError || rethrow()
        throw(InputError(first_shard, "cannot build a model for its images: $(e.msg)"))
    end
    save_weights(path, init_weights(spec; seed=seed))
    println(out, "weights: $path did not exist; initialised from seed $seed for ",
            "(W, H, C) = ($w, $h, $c), 2 classes, and wrote it")
    return load_weights(path)  # what the file holds is what runs
end

"""Create the output folder; `InputError(path, …)` if it is a file or cannot be made."""
function make_output_folder(path::AbstractString)
    ispath(path) && !isdir(path) &&
        throw(InputError(path, "exists and is not a folder (--output needs a folder)"))
    try
        mkpath(path)
    catch e
        e isa InterruptException && rethrow()
        throw(InputError(path, "cannot create the output folder ($(first_line(e)))"))
    end
    return path
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
    make_output_folder(o.output)
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
            default_spec(size(rgb, 3), size(rgb, 2), c)
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

# ---------------------------------------------------------------------------------------------
# Response files and train mode

"""Replace each `@PATH` argument by the lines of PATH (one argument a line; blank lines skipped)."""
function expand_response_files(args::AbstractVector{<:AbstractString})
    out = String[]
    for arg in args
        if startswith(arg, "@") && length(arg) > 1
            path = arg[2:end]
            isfile(path) || throw(InputError(path, "no such response file (from $arg)"))
            for line in readlines(path)
                line = rstrip(line, '\r')
                isempty(strip(line)) || push!(out, line)
            end
        else
            push!(out, arg)
        end
    end
    return out
end

Base.@kwdef mutable struct TrainOptions
    inputs::Vector{Pair{String,String}} = Pair{String,String}[]
    weights::String = ""
    output::String = ""
    settings::Dict{Symbol,Any} = Dict{Symbol,Any}()
    help::Bool = false
end

const TRAIN_OPTIONS = ("--input", "--weights", "--output", "--epochs", "--batch-size", "--lr",
                       "--beta1", "--beta2", "--eps", "--weight-decay", "--val-fraction",
                       "--patience", "--seed", "--flip", "--shift", "--help")

function parse_real(opt, text, ok, what)
    v = tryparse(Float64, text)
    (v === nothing || !isfinite(v) || !ok(v)) &&
        throw(InputError(opt, "must be a number $what, got \"$text\""))
    return v
end

"""Parse `train`'s options (after the word `train`) into `TrainOptions`; `InputError` on bad usage."""
function parse_train_args(args::AbstractVector{<:AbstractString})
    o = TrainOptions()
    o.help, options = split_options(args, TRAIN_OPTIONS, ("--input",); command="train")
    for (opt, values) in options
        v = values[1]
        s = o.settings
        if opt == "--input"
            for item in values
                name, dir = occursin('=', item) ? Tuple(split(item, '='; limit=2)) : ("", "")
                (isempty(name) || isempty(dir)) &&
                    throw(InputError(opt, "expected NAME=DIR, got \"$item\""))
                any(p -> p.first == name, o.inputs) &&
                    throw(InputError(opt, "source name \"$name\" given twice"))
                push!(o.inputs, String(name) => String(dir))
            end
        elseif opt == "--weights"
            o.weights = v
        elseif opt == "--output"
            o.output = v
        elseif opt == "--epochs"
            s[:epochs] = parse_int(opt, v, 0)
        elseif opt == "--batch-size"
            s[:batch_size] = parse_int(opt, v, 1)
        elseif opt == "--patience"
            s[:patience] = parse_int(opt, v, 0)
        elseif opt == "--seed"
            s[:seed] = parse_int(opt, v, 0)
        elseif opt == "--shift"
            s[:shift] = parse_int(opt, v, 0)
            s[:shift] <= 1_000_000 || throw(InputError(opt, "must be <= 1000000, got \"$v\""))
        elseif opt == "--flip"
            v in ("0", "1") || throw(InputError(opt, "must be 0 or 1, got \"$v\""))
            s[:flip] = v == "1"
        elseif opt == "--lr"
            s[:lr] = parse_real(opt, v, x -> x > 0, "> 0")
        elseif opt in ("--beta1", "--beta2")
            s[Symbol(opt[3:end])] = parse_real(opt, v, x -> 0 <= x < 1, "in [0, 1)")
        elseif opt == "--eps"
            s[:eps] = parse_real(opt, v, x -> x > 0, "> 0")
        elseif opt == "--weight-decay"
            s[:weight_decay] = parse_real(opt, v, x -> x >= 0, ">= 0")
        elseif opt == "--val-fraction"
            s[:val_fraction] = parse_real(opt, v, x -> 0 <= x < 1, "in [0, 1)")
        end
    end
    o.help && return o
    isempty(o.inputs) && throw(InputError("--input", "is required (NAME=DIR for each source)"))
    isempty(o.weights) && throw(InputError("--weights", "is required"))
    isempty(o.output) && throw(InputError("--output", "is required"))
    return o
end

train_settings(o::TrainOptions) = TrainSettings(; o.settings...)

"""`train` mode: check the inputs, then train (or go on from OUTPUT's checkpoint)."""
function run_train(o::TrainOptions, out::IO; hook=nothing)
    init = load_weights(o.weights)
    settings = train_settings(o)
    shards = scan_sources(o.inputs, init.spec, settings)
    make_output_folder(o.output)
    return train(TrainJob(init.spec, settings, shards, o.output), init, out; hook=hook)
end

"""
    main(args; out=stdout, err=stderr) -> exit code

The command line (see `USAGE`): classify shards or one image, `train …`, or `serve` (jobs read
from stdin, serve.jl). Errors are reported as one line on `err`
(`flux_model: error: <file>: <problem>`) with exit code 1; outputs already written stay.
Set `SYNTHFLUX_DEBUG=1` to get the full stack trace as well.
"""
function main(args::AbstractVector{<:AbstractString}; out::IO=stdout, err::IO=stderr)
    try
        !isempty(args) && args[1] == "serve" && length(args) == 1 && return serve(stdin, out)
        args = expand_response_files(args)
        if !isempty(args) && args[1] == "train"
            t = parse_train_args(args[2:end])
            t.help ? print(out, USAGE) : run_train(t, out)
            return 0
        end
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
