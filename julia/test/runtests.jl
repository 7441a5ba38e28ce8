# Tests of SynthFluxModel: random inputs, the golden files written by the PyTorch reference
# (tests/fixtures/golden, see make_golden.py there), weights/shard I/O, the CLI and its errors.
#
#   julia --project=julia julia/test/runtests.jl      (or: julia --project=julia -e 'using Pkg; Pkg.test()')

using Test
using NPZ: npzread, npzwrite

include(joinpath(@__DIR__, "..", "src", "SynthFluxModel.jl"))
using .SynthFluxModel
const M = SynthFluxModel

# pool2x2's gradient for Zygote, so that Zygote through the training Chain can be checked
# against the written-out pass. Here, not in src: training never uses Zygote, and the macro
# (MacroTools) run while the sysimage is written left it unloadable on Julia 1.5.
M.Flux.Zygote.@adjoint function M.pool2x2(x::AbstractArray{T,4}) where {T}
    y, which = M.pool2x2_argmax(x)
    return y, dy -> (M.pool2x2_gradient(dy, which, x),)
end

const GOLDEN = normpath(joinpath(@__DIR__, "..", "..", "tests", "fixtures", "golden"))
const CASES = sort!(filter(c -> isfile(joinpath(GOLDEN, c, "weights.npz")), readdir(GOLDEN)))

shards_of(case) = sort!(filter(f -> occursin(r"^shard-.*\.npz$", f), readdir(joinpath(GOLDEN, case))))
expected_probs(case, shard) = npzread(joinpath(GOLDEN, case, "expected", M.probs_name(shard)))

randimages(rng, w, h, c, n) = randn(rng, Float32, w, h, c, n)

# Run the CLI in-process; returns (exit code, stdout text, stderr text).
function run_cli(args...)
    out, err = IOBuffer(), IOBuffer()
    code = M.main(collect(String, args); out=out, err=err)
    return code, String(take!(out)), String(take!(err))
end

function write_shard(path; images, labels=nothing, ids=nothing)
    n = size(images, 4)
    vars = Dict{String,Any}("images" => images,
                            "labels" => labels === nothing ? zeros(Int64, n) : labels,
                            "ids" => ids === nothing ? collect(Int64, 100:99+n) : ids)
    npzwrite(path, vars)
    return path
end

module FakeColorTypes
struct RGB{T}
    r::T
    g::T
    b::T
end
Base.convert(::Type{RGB{Float32}}, c::RGB) = RGB{Float32}(c.r, c.g, c.b)
red(c::RGB) = c.r
green(c::RGB) = c.g
blue(c::RGB) = c.b
end

# --- training helpers -------------------------------------------------------------------------

const TSPEC = ArchSpec(8, 6, 1, 2, 3, [4])

# A source folder of shards whose label shows in the pixels' mean (learnable in a few epochs);
# `flip_val` gives the validation images (by the split hash) the opposite labels.
function write_source(dir, name; shards=(10, 7), seed=0, val_fraction=0.0, flip_val=false,
                      spec=TSPEC, first_id=1)
    mkpath(dir)
    rng = M.MersenneTwister(hash((name, seed)))
    id = first_id
    for (s, n) in enumerate(shards)
        ids = collect(Int64, id:id+n-1)
        id += n
        labels = Int64[rand(rng, 0:spec.n_classes-1) for _ in 1:n]
        images = randn(rng, Float32, spec.width, spec.height, spec.channels, n) .* 0.5f0
        for j in 1:n
            images[:, :, :, j] .+= 0.8f0 * (2 * labels[j] - 1)
            if flip_val && M.is_validation(0, name, ids[j], val_fraction)
                labels[j] = 1 - labels[j]
            end
        end
        write_shard(joinpath(dir, "shard-$(lpad(s - 1, 5, '0')).npz"); images=images,
                    labels=labels, ids=ids)
    end
    return dir
end

# DIR/init.npz: TSPEC's initial weights from `seed`; returns its path.
function write_init(dir; seed=1)
    path = joinpath(dir, "init.npz")
    save_weights(path, init_weights(TSPEC; seed=seed))
    return path
end

train_args(inputs, weights, output, extra...) =
    ["train", "--input", inputs..., "--weights", weights, "--output", output, extra...]

metric_lines(text) = [l for l in split(text, '\n') if startswith(l, "metrics: ")]

# The numbers of a `metrics: {...}` line or a metrics.jsonl line (null -> NaN).
function parse_metrics(line)
    d = Dict{String,Float64}()
    for m in eachmatch(r"\"(\w+)\": (null|[-+0-9.eE]+)", line)
        d[m.captures[1]] = m.captures[2] == "null" ? NaN : parse(Float64, m.captures[2])
    end
    return d
end

same_arrays(a::AbstractDict, b::AbstractDict) =
    sort!(collect(keys(a))) == sort!(collect(keys(b))) && all(isequal(a[k], b[k]) for k in keys(a))

@testset "SynthFluxModel" begin

@testset "ArchSpec" begin
    spec = ArchSpec(12, 10, 3, 2, 5, [4, 6])
    @test M.feature_shape(spec) == (3, 2, 6)
    @test M.arch_vector(spec) == [1, 12, 10, 3, 2, 5, 2, 4, 6]
    @test M.spec_from_arch(M.arch_vector(spec)) == spec
    @test_throws ArgumentError ArchSpec(12, 10, 1, 2, 4, [4])        # even kernel
    @test_throws ArgumentError ArchSpec(12, 10, 1, 1, 3, [4])        # one class
    @test_throws ArgumentError ArchSpec(12, 10, 0, 2, 3, [4])        # no channels
    @test_throws ArgumentError ArchSpec(12, 10, 1, 2, 3, Int[])      # no blocks
    @test_throws ArgumentError ArchSpec(12, 7, 1, 2, 3, [4, 4, 4])   # 7 >> 3 == 0
    @test_throws ArgumentError M.spec_from_arch([2, 12, 10, 1, 2, 3, 1, 4])  # format version
    @test_throws ArgumentError M.spec_from_arch([1, 12, 10, 1, 2, 3, 2, 4])  # block count
end

@testset "shapes and probabilities on random inputs" begin
    rng = M.MersenneTwister(1)
    for (w, h, c, k, kernel, blocks) in ((12, 10, 1, 2, 3, [4, 6]), (9, 14, 3, 3, 5, [3]),
                                         (64, 64, 1, 2, 3, [8, 16]), (16, 8, 2, 4, 3, [2, 3, 4]))
        spec = ArchSpec(w, h, c, k, kernel, blocks)
        model = build_model(spec; seed=3)
        x = randimages(rng, w, h, c, 7)
        @test size(model(x)) == (k, 7)  # logits
        probs = predict(model, x; batch_size=3)  # uneven last batch
        @test probs isa Matrix{Float32} && size(probs) == (k, 7)
        @test all(abs.(sum(probs; dims=1) .- 1) .< 1e-5)
        @test all(probs .> 0)
        @test maximum(abs.(probs .- predict(model, x; batch_size=64))) < 1e-6
        @test size(predict(model, x[:, :, :, 1:0])) == (k, 0)
    end
    @test_throws ArgumentError predict(build_model(ArchSpec(8, 8, 1, 2, 3, [2])),
                                       zeros(Float32, 8, 8, 1, 1); batch_size=0)
end

@testset "init_weights is deterministic per seed" begin
    spec = ArchSpec(16, 12, 3, 2, 3, [8, 16])
    a, b, c = init_weights(spec; seed=7), init_weights(spec; seed=7), init_weights(spec; seed=8)
    @test sort!(collect(keys(a.arrays))) ==
          ["conv1_bias", "conv1_weight", "conv2_bias", "conv2_weight", "dense_bias", "dense_weight"]
    @test all(a.arrays[k] == b.arrays[k] for k in keys(a.arrays))
    @test all(a.arrays[k] != c.arrays[k] for k in keys(a.arrays))
    @test size(a.arrays["conv1_weight"]) == (3, 3, 3, 8)
    @test size(a.arrays["dense_weight"]) == (2, 4 * 3 * 16)
    @test maximum(abs.(a.arrays["conv1_weight"])) <= 1 / sqrt(27)
end

@testset "weights.npz round trip and errors" begin
    mktempdir() do dir
        spec = ArchSpec(12, 10, 1, 2, 3, [4, 6])
        w = init_weights(spec; seed=2)
        path = joinpath(dir, "model", "weights.npz")
        save_weights(path, w)
        @test readdir(dirname(path)) == ["weights.npz"]  # no temp file left behind
        back = load_weights(path)
        @test back.spec == spec
        @test all(back.arrays[k] == w.arrays[k] for k in keys(w.arrays))
        raw = npzread(path)
        @test raw["arch"] isa Vector{Int64}

        function bad(mutate!, pattern)
            d = Dict{String,Any}(k => v for (k, v) in npzread(path))
            mutate!(d)
            p = joinpath(dir, "bad.npz")
            npzwrite(p, d)
            e = try
                load_weights(p); nothing
            catch e
                e
            end
            return e isa InputError && e.file == p && occursin(pattern, e.msg)
        end
        @test bad(d -> delete!(d, "conv2_bias"), "missing array `conv2_bias`")
        @test bad(d -> d["dense_weight"] = d["dense_weight"][:, 1:end-1], "`dense_weight` must be float32")
        @test bad(d -> d["conv1_weight"] = Float64.(d["conv1_weight"]), "float64")
        @test bad(d -> d["arch"] = d["arch"][1:end-1], "bad `arch`")
        @test bad(d -> d["extra"] = zeros(Float32, 2), "unexpected arrays")
        @test bad(d -> d["dense_bias"][1] = NaN32, "NaN or Inf")
        @test bad(d -> delete!(d, "arch"), "no `arch`")
        @test_throws InputError load_weights(joinpath(dir, "absent.npz"))
    end
end

@testset "golden files from the PyTorch reference" begin
    for case in CASES
        w = load_weights(joinpath(GOLDEN, case, "weights.npz"))
        @test w.spec.width != w.spec.height  # non-square: a W/H swap cannot go unnoticed
        model = build_model(w)
        for shard in shards_of(case)
            data = read_shard(joinpath(GOLDEN, case, shard), w.spec)
            expected = expected_probs(case, shard)
            probs = predict(model, data.images; batch_size=4)
            # numpy's (N, K) reads as an N×K matrix; predict gives K×N.
            @test size(expected["probs"]) == reverse(size(probs))
            # Against the float64 forward pass, within the case's stated float32 tolerance.
            @test maximum(abs.(permutedims(probs) .- expected["probs"])) <= expected["atol"][1]
            @test data.ids == expected["ids"]
        end
    end
end

@testset "read_shard checks" begin
    mktempdir() do dir
        spec = ArchSpec(12, 10, 1, 2, 3, [4])
        good = randimages(M.MersenneTwister(0), 12, 10, 1, 3)
        function err(; images=good, labels=nothing, ids=nothing, spec=spec, raw=nothing)
            p = joinpath(dir, "shard-00000.npz")
            raw === nothing ? write_shard(p; images=images, labels=labels, ids=ids) :
                npzwrite(p, raw)
            try
                read_shard(p, spec); return ""
            catch e
                e isa InputError || rethrow()
                @test e.file == p
                return e.msg
            end
        end
        @test err() == ""
        nan = copy(good); nan[3, 2, 1, 2] = NaN32
        @test occursin("NaN or Inf", err(images=nan))
        inf = copy(good); inf[1] = -Inf32
        @test occursin("NaN or Inf", err(images=inf))
        @test occursin("must be float32", err(images=Float64.(good)))
        @test occursin("must be float32", err(images=good[:, :, 1, :]))
        @test occursin("`ids` must be int64 (3,)", err(ids=Int64[1, 2]))
        @test occursin("`labels` must be int64", err(labels=Int32[0, 1, 0]))
        @test occursin("expect (12, 10, 1)", err(images=randimages(M.MersenneTwister(0), 10, 12, 1, 3)))
        @test occursin("missing array `labels`",
                       err(raw=Dict{String,Any}("images" => good, "ids" => Int64[1, 2, 3])))
        @test err(spec=nothing, images=randimages(M.MersenneTwister(0), 5, 5, 2, 1)) == ""

        # A shard whose images were all rejected: empty arrays (ZipFile.jl <= 0.9 can't read them).
        empty = write_shard(joinpath(dir, "shard-00003.npz"); images=zeros(Float32, 12, 10, 1, 0))
        data = read_shard(empty, spec)
        @test size(data.images) == (12, 10, 1, 0) && isempty(data.ids) && data.ids isa Vector{Int64}

        truncated = joinpath(dir, "shard-00001.npz")
        write(truncated, read(joinpath(GOLDEN, "gray", "shard-00000.npz"))[1:300])
        @test_throws InputError read_shard(truncated)
        notnpz = joinpath(dir, "shard-00002.npz")
        write(notnpz, "hello")
        @test_throws InputError read_shard(notnpz)
        @test_throws InputError read_shard(joinpath(dir, "absent.npz"))
    end
end

@testset "write_probs layout" begin
    mktempdir() do dir
        probs = Float32[0.25 0.5 1.0; 0.75 0.5 0.0]  # K=2 × N=3
        p = write_probs(joinpath(dir, "out", "shard-00007.probs.npz"), probs, Int64[5, 6, 9])
        @test readdir(dirname(p)) == ["shard-00007.probs.npz"]
        d = npzread(p)
        @test d["probs"] == permutedims(probs)  # numpy sees (N, K)
        @test d["ids"] == [5, 6, 9] && d["ids"] isa Vector{Int64}
        @test M.probs_name("/x/shard-00007.npz") == "shard-00007.probs.npz"
    end
end

@testset "CLI over shards" begin
    mktempdir() do dir
        out = joinpath(dir, "pred")
        code, stdout_text, stderr_text = run_cli("--input", joinpath(GOLDEN, "gray"),
            "--weights", joinpath(GOLDEN, "gray", "weights.npz"), "--output", out, "--batch-size", "4")
        @test code == 0
        @test stderr_text == ""
        @test occursin(r"^shard-00000\.npz: 6 images, [\d.]+ img/s$"m, stdout_text)
        @test occursin(r"^shard-00001\.npz: 4 images, [\d.]+ img/s$"m, stdout_text)
        @test occursin("summary: 10 images in 2 shards", stdout_text)
        @test occursin("mean probability per class", stdout_text)
        for shard in shards_of("gray")
            got, expected = npzread(joinpath(out, M.probs_name(shard))), expected_probs("gray", shard)
            @test maximum(abs.(got["probs"] .- expected["probs"])) <= expected["atol"][1]
            @test got["ids"] == expected["ids"]
        end
        @test sort(readdir(out)) == ["shard-00000.probs.npz", "shard-00001.probs.npz"]

        # Missing weights: initialised from the seed for the input's size, written, reused.
        wpath = joinpath(dir, "new", "weights.npz")
        code, text, _ = run_cli("--input", joinpath(GOLDEN, "rgb", "shard-00000.npz"),
                                "--weights", wpath, "--output", joinpath(dir, "p2"), "--seed", "5")
        @test code == 0 && isfile(wpath) && occursin("initialised from seed 5", text)
        w = load_weights(wpath)
        @test w.spec == ArchSpec(12, 10, 3, 2, 3, [8, 16])
        @test all(w.arrays[k] == init_weights(w.spec; seed=5).arrays[k] for k in keys(w.arrays))
        first_probs = npzread(joinpath(dir, "p2", "shard-00000.probs.npz"))["probs"]
        code, text, _ = run_cli("--input", joinpath(GOLDEN, "rgb", "shard-00000.npz"),
                                "--weights", wpath, "--output", joinpath(dir, "p2"), "--seed", "6")
        @test code == 0 && !occursin("initialised", text)
        @test npzread(joinpath(dir, "p2", "shard-00000.probs.npz"))["probs"] == first_probs
    end
end

@testset "CLI errors: one line, exit 1, earlier outputs intact" begin
    mktempdir() do dir
        weights = joinpath(GOLDEN, "gray", "weights.npz")
        input = joinpath(dir, "in")
        mkpath(input)
        cp(joinpath(GOLDEN, "gray", "shard-00000.npz"), joinpath(input, "shard-00000.npz"))
        corrupt = joinpath(input, "shard-00001.npz")
        write(corrupt, read(joinpath(GOLDEN, "gray", "shard-00001.npz"))[1:200])
        out = joinpath(dir, "pred")
        mkpath(out)
        stale = joinpath(out, "shard-00001.probs.npz")
        write(stale, "previous output")

        code, _, err = run_cli("--input", input, "--weights", weights, "--output", out)
        @test code == 1
        @test count(==('\n'), err) == 1
        @test startswith(err, "flux_model: error: $corrupt: ")
        @test isfile(joinpath(out, "shard-00000.probs.npz"))  # written before the bad shard
        @test read(stale, String) == "previous output"         # not clobbered
        @test !any(f -> endswith(f, ".tmp"), readdir(out))

        # NaN in the input, wrong size for the weights, weights that don't fit.
        nan = randimages(M.MersenneTwister(0), 12, 10, 1, 2); nan[1] = NaN32
        nanshard = write_shard(joinpath(dir, "shard-00009.npz"); images=nan)
        code, _, err = run_cli("--input", nanshard, "--weights", weights, "--output", out)
        @test code == 1 && err == "flux_model: error: $nanshard: `images` holds NaN or Inf\n"
        rgbshard = joinpath(GOLDEN, "rgb", "shard-00000.npz")
        code, _, err = run_cli("--input", rgbshard, "--weights", weights, "--output", out)
        @test code == 1 && startswith(err, "flux_model: error: $rgbshard: images are (W, H, C)")
        badw = joinpath(dir, "badw.npz")
        npzwrite(badw, Dict{String,Any}("arch" => Int64[1, 12, 10, 1, 2, 3, 1, 4]))
        code, _, err = run_cli("--input", rgbshard, "--weights", badw, "--output", out)
        @test code == 1 && err == "flux_model: error: $badw: missing array `conv1_weight`\n"

        # An output path that is a file; a shard holding a pickled (object) array.
        code, _, err = run_cli("--input", rgbshard, "--weights", weights, "--output", badw)
        @test code == 1 && err == "flux_model: error: $badw: exists and is not a folder " *
                                  "(--output needs a folder)\n"
        pickled = joinpath(GOLDEN, "..", "bad", "object-array.npz")
        code, _, err = run_cli("--input", pickled, "--weights", weights, "--output", out)
        @test code == 1 && occursin("object-array.npz: holds a pickled (numpy object) array", err)

        for (args, pattern) in (
                (["--input", input, "--weights", weights], "--output: is required"),
                (["--input", input, "--output", out], "--weights: is required"),
                (["--weights", weights, "--output", out], "--input: is required"),
                (["--input", input, "--weights", weights, "--output", out, "--batch-size", "0"],
                 "--batch-size: must be an integer >= 1"),
                (["--input", input, "--weights", weights, "--output", out, "--frobnicate"],
                 "--frobnicate: unknown option"),
                (["--input", joinpath(dir, "absent"), "--weights", weights, "--output", out],
                 "absent: no such file or folder"),
                (["--input", out, "--weights", weights, "--output", out], "no shard-*.npz files"),
                (["stray.txt", "--weights", weights], "stray.txt: unexpected argument"))
            code, stdout_text, err = run_cli(args...)
            @test code == 1
            @test startswith(err, "flux_model: error: ") && occursin(pattern, err)
            @test count(==('\n'), err) == 1
        end
        code, text, err = run_cli("--help")
        @test code == 0 && occursin("usage:", text) && err == ""
    end
end

@testset "single images" begin
    spec = ArchSpec(4, 3, 1, 2, 3, [2])
    rgb = zeros(Float32, 3, 3, 4)  # (3, H, W)
    rgb[:, 2, 4] .= 1.0f0           # white pixel at row 2, column 4
    rgb[1, 1, 1] = 1.0f0            # pure red at row 1, column 1
    x = image_to_whcn(rgb, spec)
    @test size(x) == (4, 3, 1, 1)
    @test x[4, 2, 1, 1] ≈ 1.0f0                # (1 - 0.5) / 0.5
    @test x[1, 1, 1, 1] ≈ (0.299f0 - 0.5f0) / 0.5f0
    @test x[2, 1, 1, 1] ≈ -1.0f0
    x3 = image_to_whcn(rgb, ArchSpec(4, 3, 3, 2, 3, [2]); mean=[0.0, 0.5, 0.5], std=[1.0])
    @test x3[1, 1, :, 1] ≈ Float32[1.0, -0.5, -0.5]
    big = image_to_whcn(rand(M.MersenneTwister(0), Float32, 3, 30, 40), ArchSpec(8, 6, 1, 2, 3, [2]))
    @test size(big) == (8, 6, 1, 1) && all(-1 .<= big .<= 1)
    flat = image_to_whcn(fill(0.75f0, 3, 30, 40), ArchSpec(8, 6, 3, 2, 3, [2]))
    @test all(flat .≈ 0.5f0)  # resizing a constant image keeps it constant
    @test_throws ArgumentError image_to_whcn(rgb, spec; std=[0.0])
    @test_throws ArgumentError image_to_whcn(rgb, spec; mean=[0.1, 0.2])
    @test M.is_image_path("a/b.PNG") && M.is_image_path("x.jpeg") && !M.is_image_path("s.npz")

    # Decoded pixels (FileIO's H×W matrix of colours, row = y) land at out[:, y, x]; a stand-in
    # for ColorTypes keeps this testable without the image packages.
    img = [FakeColorTypes.RGB{Float32}(y, x, 0) for y in 1:3, x in 1:4]
    out = M.rgb_array(FakeColorTypes, img)
    @test size(out) == (3, 3, 4) && out[:, 2, 4] == Float32[2, 4, 0]
    @test image_to_whcn(out, ArchSpec(4, 3, 3, 2, 3, [2]); mean=[0], std=[1])[4, 2, :, 1] ==
          Float32[2, 4, 0]

    # Without FileIO the image path fails with one line saying what to install.
    if Base.find_package("FileIO") === nothing
        mktempdir() do dir
            png = joinpath(dir, "img.png")
            write(png, "not really a png")
            code, _, err = run_cli(png, "--weights", joinpath(GOLDEN, "gray", "weights.npz"))
            @test code == 1 && startswith(err, "flux_model: error: $png: reading PNG/JPEG needs")
            @test count(==('\n'), err) == 1
        end
    end
end

@testset "unit_hash and the rules built on it" begin
    h = unit_hash(0, "split", "synthetic", 5)
    @test h == 5372812218141759764
    @test (h >> 11) / 2^53 == 0.2912607339632979 == M.unit_float(h)
    @test unit_hash(7, "order", 3, "real-train", 1000002) == 18302822084227979998
    @test unit_hash(123, "shard", 1, "synthetic", "shard-00002.npz") == 12758308679136725817
    @test unit_hash(7, "augment", 2, "digits", 4611686018427387904) == 16321656232220981730
    @test unit_hash(Int32(7), "order", UInt8(3), "real-train", 1000002) ==
          unit_hash(7, "order", 3, "real-train", 1000002)  # decimal text, whatever the type
    @test_throws ArgumentError unit_hash(1.5)
    @test_throws ArgumentError unit_hash(true)
    @test M.is_validation(0, "synthetic", 5, 0.3) && !M.is_validation(0, "synthetic", 5, 0.29)
    ids = collect(Int64, 1:20)
    keys_ = [unit_hash(4, "order", 2, "s", i) for i in ids]
    @test issorted(keys_[M.image_order(4, 2, "s", ids)])
    @test M.image_order(4, 2, "s", ids) != M.image_order(4, 3, "s", ids)
    # The augmentation's parameters from the hash's bits.
    h = unit_hash(7, "augment", 2, "digits", 4611686018427387904)
    @test M.augmentation(7, 2, "digits", 4611686018427387904, true, 2) ==
          (isodd(h), Int((h >> 8) % 5) - 2, Int((h >> 24) % 5) - 2)
    @test M.augmentation(7, 2, "digits", 4611686018427387904, false, 0) == (false, 0, 0)
end

@testset "augmentation: flip, shift, edge clamp" begin
    img = Float32[10x + y for x in 0:3, y in 0:2]  # W=4, H=3: value 10x + y at column x, row y
    img = reshape(img, 4, 3, 1)
    out = similar(img)
    @test M.augment!(out, img, false, 0, 0) == img
    @test M.augment!(out, img, true, 0, 0)[:, :, 1] == Float32[30 31 32; 20 21 22; 10 11 12; 0 1 2]
    # dx = 1: out[x] = in[x - 1], the left edge repeated; dy = -1: out[y] = in[y + 1].
    @test M.augment!(out, img, false, 1, -1)[:, :, 1] ==
          Float32[1 2 2; 1 2 2; 11 12 12; 21 22 22]
    # Flipped and shifted by dx = 2, dy = 1: out[x, y] = in[clamp(3 - x - 2), clamp(y - 1)].
    @test M.augment!(out, img, true, 2, 1)[:, :, 1] == Float32[10 10 11; 0 0 1; 0 0 1; 0 0 1]
    two = cat(img, img .+ 100; dims=3)  # channels move together
    @test M.augment!(similar(two), two, true, 1, 0)[:, :, 2] ==
          M.augment!(similar(img), img, true, 1, 0)[:, :, 1] .+ 100
end

@testset "AdamW step against a hand computation" begin
    st = TrainSettings(lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
    p, g = Float32[1.0, -2.0], Float32[0.5, 0.0]
    m, v = zeros(Float32, 2), zeros(Float32, 2)
    M.adamw_update!(p, g, m, v, M.adamw_scalars(st, 1))
    # t = 1: m = 0.1 g, v = 0.001 g², m̂ = g, v̂ = g², so p -= lr · g / (|g| + eps).
    @test m ≈ Float32[0.05, 0] && v ≈ Float32[0.00025, 0]
    @test p[1] ≈ 1.0 - 0.1 * 0.5 / (0.5 + 1e-8) atol = 1e-6
    @test p[2] == -2.0f0  # zero gradient, zero moments: no move
    # t = 2 with g = 0.5 again, in Float64 by hand.
    M.adamw_update!(p, g, m, v, M.adamw_scalars(st, 2))
    m2, v2 = 0.9 * 0.05 + 0.1 * 0.5, 0.999 * 0.00025 + 0.001 * 0.25
    expected = (1.0 - 0.1 * 0.5 / (0.5 + 1e-8)) - (0.1 / (1 - 0.81)) * m2 / (sqrt(v2) / sqrt(1 - 0.999^2) + 1e-8)
    @test p[1] ≈ expected atol = 1e-6
    # Decoupled weight decay: p · (1 - lr·wd) first; a `nothing` gradient is zero.
    st = TrainSettings(lr=0.01, weight_decay=0.5)
    p, m, v = Float32[2.0], zeros(Float32, 1), zeros(Float32, 1)
    M.adamw_update!(p, nothing, m, v, M.adamw_scalars(st, 1))
    @test p == Float32[2.0f0 * Float32(1 - 0.005)] && m == [0] && v == [0]
    # The scalars are Float64 expressions rounded once, and the update is this exact Float32 code.
    k = M.adamw_scalars(TrainSettings(lr=3e-3, beta1=0.8, beta2=0.99, eps=1e-7, weight_decay=0.1), 3)
    @test k.a == Float32(3e-3 / (1 - 0.8^3)) && k.s == Float32(sqrt(1 - 0.99^3))
    @test k.c1 == Float32(1 - 0.8) && k.d == Float32(1 - 3e-4) && k.e == Float32(1e-7)
    p0, g0, m0, v0 = 0.3f0, -0.7f0, 0.01f0, 0.002f0
    p, m, v = [p0], [m0], [v0]
    M.adamw_update!(p, [g0], m, v, k)
    mm = k.b1 * m0 + k.c1 * g0
    vv = k.b2 * v0 + k.c2 * (g0 * g0)
    @test m[1] === mm && v[1] === vv && p[1] === (p0 * k.d) - k.a * mm / (sqrt(vv) / k.s + k.e)
end

@testset "max-pooling: MaxPool's forward, the gradient to the first maximum" begin
    rng = M.MersenneTwister(2)
    for (w, h) in ((4, 4), (5, 7), (12, 10))
        x = randn(rng, Float32, w, h, 3, 2)
        @test M.pool2x2(x) == M.MaxPool((2, 2))(x)
    end
    # A window (x, y) = (0,0) 1.0, (1,0) 1.0001, (0,1) 1.0001, (1,1) 0.5: the gradient goes to
    # the first true maximum, (1,0), as in PyTorch (NNlib's ∇maxpool takes (0,0), ≈ the max).
    x = reshape(Float32[1.0, 1.0001, 1.0001, 0.5], 2, 2, 1, 1)
    y, back = M.Flux.pullback(M.pool2x2, x)
    @test y == reshape([1.0001f0], 1, 1, 1, 1)
    @test back(ones(Float32, 1, 1, 1, 1))[1] == reshape(Float32[0, 1, 0, 0], 2, 2, 1, 1)
    ties = reshape(Float32[0.5, 2.0, 2.0, 2.0, 0.0, 0.0, 0.0, 0.0, 9, 9, 9, 9], 2, 2, 3, 1)
    g = M.Flux.pullback(M.pool2x2, ties)[2](reshape(Float32[1, 2, 3], 1, 1, 3, 1))[1]
    @test g[:, :, 1, 1] == [0 0; 1 0] && g[:, :, 2, 1] == [2 0; 0 0] && g[:, :, 3, 1] == [3 0; 0 0]
    # A 5x7 input: the last column and row are dropped and get no gradient.
    x = randn(rng, Float32, 5, 7, 1, 1)
    gx = M.Flux.pullback(M.pool2x2, x)[2](ones(Float32, 2, 3, 1, 1))[1]
    @test all(gx[5, :, 1, 1] .== 0) && all(gx[:, 7, 1, 1] .== 0) && sum(gx) == 6
    # The same values and gradient, bit for bit, as Zygote through `maximum(…; dims)` (the first
    # maximum by `findmax`), also on ties after relu and on odd sizes.
    by_maximum(x) = (w2 = size(x, 1) ÷ 2; h2 = size(x, 2) ÷ 2;
                     xc = x[1:2w2, 1:2h2, :, :];
                     reshape(maximum(reshape(xc, 2, w2, 2, h2, size(x, 3), size(x, 4)); dims=(1, 3)),
                             w2, h2, size(x, 3), size(x, 4)))
    # NaN (the largest) and -0.0 (below 0.0) take the `isless` loop; elsewhere the fast `<`
    # loop picks the same elements.
    odd = Float32[NaN, -0.0, 0.0, 1, -1, Inf, -Inf, 2]
    for x in (rand(rng, odd, 6, 8, 3, 4), rand(rng, odd[3:end], 6, 8, 3, 4))
        @test isequal(M.pool2x2_argmax(x), M.pool2x2_argmax(x, isless))
    end
    @test M.pool2x2(Float32[-0.0 0.0; 0.0 0.0][:, :, :, :])[1] === 0.0f0
    @test isnan(M.pool2x2(Float32[1 NaN; 2 3][:, :, :, :])[1])
    for (w, h) in ((4, 4), (5, 7), (16, 16))
        x = M.relu.(round.(randn(rng, Float32, w, h, 3, 4); digits=1))  # many equal values
        dy = randn(rng, Float32, w ÷ 2, h ÷ 2, 3, 4)
        (a, back_a), (b, back_b) = M.Flux.pullback(M.pool2x2, x), M.Flux.pullback(by_maximum, x)
        @test a == b && back_a(dy)[1] == back_b(dy)[1]
    end
end

@testset "training convolutions: patches and add_patches adjoint, one gemm = Flux's Conv" begin
    rng = M.MersenneTwister(3)
    for k in (1, 3, 5), (w, h) in ((5, 4), (1, 3))  # also images narrower than the kernel
        x = randn(rng, w, h, 2, 3)  # (W, H, N, C)
        cols = M.patches(x, k)
        @test size(cols) == (w * h * 2, k * k * 3)
        d = randn(rng, size(cols))
        @test sum(cols .* d) ≈ sum(x .* M.add_patches(d, size(x), k))
        conv = M.Conv(randn(rng, k, k, 3, 4), randn(rng, 4), M.relu; pad=k ÷ 2)
        y, _ = M.forward(conv, x)
        @test permutedims(y, (1, 2, 4, 3)) ≈ conv(permutedims(x, (1, 2, 4, 3)))
    end
    @test_throws ErrorException M.forward(M.Conv(ones(3, 3, 1, 1), zeros(1), M.relu; pad=0), ones(4, 4, 1, 1))
end

@testset "explicit gradient against finite differences and Zygote ($(length(blocks)) blocks, kernel $kernel)" for (blocks, kernel) in (([3], 3), ([3, 2], 3), ([2], 5))
    spec = ArchSpec(6, 4, 2, 3, kernel, blocks)
    w = init_weights(spec; seed=4)
    f64 = Dict(k => Float64.(a) for (k, a) in w.arrays)
    convs = [(M.Conv(f64["conv$(i)_weight"], f64["conv$(i)_bias"], M.relu; pad=kernel ÷ 2), M.pool2x2)
             for i in 1:length(blocks)]
    model64 = M.Chain(Iterators.flatten(convs)..., M.flatten_whcn,
                      M.Dense(f64["dense_weight"], f64["dense_bias"]))
    rng = M.MersenneTwister(9)
    x = randn(rng, Float64, 6, 4, 2, 5)
    labels = [0, 2, 1, 1, 0]
    y = M.onehot_matrix(Float64, labels, 3)
    loss(m) = M.Flux.logitcrossentropy(m(x), y)
    logits, l, g = M.loss_and_gradient(model64, x, labels, 3)
    # The batched convolutions of the training pass (conv.jl) against the Chain's: the same
    # logits up to float64 rounding.
    @test l ≈ loss(model64) && isapprox(logits, model64(x); rtol=1e-12)
    ls, right = M.example_stats(logits, labels)
    @test ls / 5 ≈ l
    @test right == count(j -> argmax(logits[:, j]) == labels[j] + 1, 1:5)
    # Zygote through the same Chain (pool2x2's own adjoint): the same gradient.
    zg = M.Flux.gradient(loss, model64)[1]
    worst = 0.0
    for slot in M.param_slots(spec)
        p, gp = M.param_array(model64, slot), M.grad_array(g, slot)
        @test size(gp) == size(p)
        @test isapprox(gp, M.grad_array(zg, slot); rtol=1e-10)
        for i in eachindex(p)
            old = p[i]
            p[i] = old + 1e-6; up = loss(model64)
            p[i] = old - 1e-6; down = loss(model64)
            p[i] = old
            worst = max(worst, abs((up - down) / 2e-6 - gp[i]))
        end
    end
    @test worst < 1e-6
    # Float32, as training runs it: the same gradient up to float32 rounding.
    model32 = M.train_model(w)
    @test model32(Float32.(x)) == build_model(w)(Float32.(x))  # classify's logits, bit for bit
    _, _, g32 = M.loss_and_gradient(model32, Float32.(x), labels, 3)
    for slot in M.param_slots(spec)
        a, b = M.grad_array(g32, slot), M.grad_array(g, slot)
        @test eltype(a) == Float32
        @test maximum(abs.(a .- b)) <= 1e-4 * max(maximum(abs.(b)), 1e-3)
    end
    # Buffers reused by the next batch, and by a smaller one: the same results as fresh ones,
    # and the first call's logits and gradient left as they were.
    buffers = M.layer_buffers(model32)
    first = M.loss_and_gradient(model32, Float32.(x), labels, 3; buffers=buffers)
    kept = deepcopy(first)
    other = randn(M.MersenneTwister(9), Float32, size(x)...)
    @test M.loss_and_gradient(model32, other, labels, 3; buffers=buffers) ==
          M.loss_and_gradient(model32, other, labels, 3)
    @test first == kept && first == M.loss_and_gradient(model32, Float32.(x), labels, 3)
    small = M.loss_and_gradient(model32, other[:, :, :, 1:2], labels[1:2], 3; buffers=buffers)
    @test small == M.loss_and_gradient(model32, other[:, :, :, 1:2], labels[1:2], 3)
    @test M.grad_array(nothing, M.param_slots(spec)[1]) === nothing
    @test M.grad_array((layers=(nothing, nothing, nothing, nothing),), M.param_slots(spec)[1]) === nothing
end

@testset "train: a tiny run through the CLI" begin
    mktempdir() do dir
        a = write_source(joinpath(dir, "synthetic"), "synthetic"; shards=(10, 7, 9))
        b = write_source(joinpath(dir, "real"), "real"; shards=(6,), first_id=1000001)
        init = write_init(dir; seed=3)
        out = joinpath(dir, "run")
        code, text, err = run_cli(train_args(["synthetic=$a", "real=$b"], init, out,
            "--epochs", "5", "--batch-size", "4", "--lr", "0.01", "--val-fraction", "0.25",
            "--patience", "0", "--flip", "1", "--shift", "1")...)
        @test code == 0 && err == ""
        lines = metric_lines(text)
        @test length(lines) == 5
        ms = parse_metrics.(lines)
        @test [m["epoch"] for m in ms] == 1:5
        n_val = count(s -> true, (1 for (name, ids) in (("synthetic", 1:26), ("real", 1000001:1000006))
                                  for i in ids if M.is_validation(0, name, i, 0.25)))
        steps = cld(32 - n_val, 4)
        @test [m["steps"] for m in ms] == steps .* (1:5)
        @test ms[end]["train_loss"] < ms[1]["train_loss"]
        @test ms[end]["train_accuracy"] > 0.8
        @test all(m -> 0 <= m["val_accuracy"] <= 1 && m["val_loss"] > 0 && m["images_per_s"] > 0, ms)
        @test all(m -> m["best_epoch"] == argmin([x["val_loss"] for x in ms[1:Int(m["epoch"])]]), ms)
        @test occursin(Regex("^progress: $steps/$steps\$", "m"), text)
        @test count(l -> startswith(l, "progress: "), split(text, '\n')) == 5 * min(steps, 10)
        @test occursin(r"^done: stopped after 5 epochs; best epoch \d", split(text, '\n')[end-1])
        @test sort(readdir(out)) == ["checkpoint.npz", "metrics.jsonl", "weights.npz"]
        jsonl = readlines(joinpath(out, "metrics.jsonl"))
        @test length(jsonl) == 5 && all(startswith.(jsonl, "{\"epoch\": "))
        @test [parse_metrics(l)["train_loss"] for l in jsonl] ≈ [m["train_loss"] for m in ms]
        @test parse_metrics(jsonl[end])["best_epoch"] == ms[end]["best_epoch"]
        ck = npzread(joinpath(out, "checkpoint.npz"))
        best = Int(ms[end]["best_epoch"])
        @test ck["state"] == [1, 5, 5 * steps, best, 5 - best, 1]
        @test size(ck["history"]) == (5, 8) && ck["history"][:, 1] == 1:5
        @test ck["best_val_loss"] == [ck["history"][best, 5]]
        result = load_weights(joinpath(out, "weights.npz"))
        @test result.spec == TSPEC
        @test all(result.arrays[k] == ck["best_" * k] for k in keys(result.arrays))
        @test all(ck[k] != init_weights(TSPEC; seed=3).arrays[k] for k in keys(result.arrays))

        # Without validation images: val_* are null and the last epoch is the best.
        out2 = joinpath(dir, "run2")
        code, text, err = run_cli(train_args(["synthetic=$a"], init, out2, "--epochs", "2",
                                             "--val-fraction", "0", "--batch-size", "32")...)
        @test code == 0
        lines = metric_lines(text)
        @test occursin("\"val_loss\": null, \"val_accuracy\": null", lines[1])
        @test [parse_metrics(l)["best_epoch"] for l in lines] == [1, 2]
        @test [parse_metrics(l)["steps"] for l in lines] == [1, 2]  # 26 images, one batch
        ck = npzread(joinpath(out2, "checkpoint.npz"))
        @test all(ck[k] == ck["best_" * k] for k in keys(init_weights(TSPEC).arrays))
        @test isnan(ck["best_val_loss"][1])

        # --epochs 0: the initial weights are the result, and a checkpoint with no epochs.
        out3 = joinpath(dir, "run3")
        code, text, _ = run_cli(train_args(["synthetic=$a"], init, out3, "--epochs", "0")...)
        @test code == 0 && isempty(metric_lines(text))
        @test same_arrays(npzread(joinpath(out3, "weights.npz")), npzread(init))
        @test read(joinpath(out3, "metrics.jsonl"), String) == ""
        ck = M.read_checkpoint(joinpath(out3, "checkpoint.npz"), TSPEC)[2]
        @test (ck.epoch, ck.step, ck.finished, size(ck.history)) == (0, 0, true, (0, 8))
        code, text, _ = run_cli(train_args(["synthetic=$a"], init, out3, "--epochs", "0")...)
        @test code == 0 && startswith(text, "resume: from epoch 0\ndone: ")
        # ... from which --epochs 2 trains as a fresh run does.
        code, text, _ = run_cli(train_args(["synthetic=$a"], init, out3, "--epochs", "2",
                                           "--val-fraction", "0", "--batch-size", "32")...)
        @test code == 0 && length(metric_lines(text)) == 2
        @test same_arrays(npzread(joinpath(out3, "weights.npz")), npzread(joinpath(out2, "weights.npz")))
    end
end

@testset "train: resume gives the uninterrupted run's weights, bit for bit" begin
    mktempdir() do dir
        a = write_source(joinpath(dir, "synthetic"), "synthetic"; shards=(9, 8, 5), seed=1)
        b = write_source(joinpath(dir, "digits"), "digits"; shards=(7, 6), seed=2, first_id=5000000)
        init = write_init(dir; seed=8)
        inputs = ["synthetic=$a", "digits=$b"]
        opts(epochs) = ("--epochs", string(epochs), "--batch-size", "5", "--lr", "0.02",
                        "--weight-decay", "0.01", "--val-fraction", "0.2", "--patience", "0",
                        "--flip", "1", "--shift", "2", "--seed", "11")
        straight = joinpath(dir, "straight")
        code, text, _ = run_cli(train_args(inputs, init, straight, opts(4)...)...)
        @test code == 0 && length(metric_lines(text)) == 4
        ref = npzread(joinpath(straight, "checkpoint.npz"))

        # Two epochs, then the same folder with --epochs 4.
        twice = joinpath(dir, "twice")
        @test run_cli(train_args(inputs, init, twice, opts(2)...)...)[1] == 0
        code, text, _ = run_cli(train_args(inputs, init, twice, opts(4)...)...)
        @test code == 0 && startswith(text, "resume: from epoch 2\n")
        @test [parse_metrics(l)["epoch"] for l in metric_lines(text)] == [3, 4]

        # Killed in the middle of epoch 3 (after its second step), then run again.
        killed = joinpath(dir, "killed")
        o = M.parse_train_args(train_args(inputs, init, killed, opts(4)...)[2:end])
        @test_throws InterruptException M.run_train(o, IOBuffer();
            hook=(epoch, step, loss) -> (epoch == 3 && step == 2) && throw(InterruptException()))
        @test npzread(joinpath(killed, "checkpoint.npz"))["state"][2] == 2
        @test !isfile(joinpath(killed, "weights.npz"))
        code, text, _ = run_cli(train_args(inputs, init, killed, opts(4)...)...)
        @test code == 0 && startswith(text, "resume: from epoch 2\n")

        for run in (twice, killed)
            ck = npzread(joinpath(run, "checkpoint.npz"))
            @test sort!(collect(keys(ck))) == sort!(collect(keys(ref)))
            @test all(isequal(ck[k], ref[k]) for k in keys(ref) if k != "history")
            @test isequal(ck["history"][:, 1:6], ref["history"][:, 1:6])  # not the timings
            @test same_arrays(npzread(joinpath(run, "weights.npz")), npzread(joinpath(straight, "weights.npz")))
            @test length(readlines(joinpath(run, "metrics.jsonl"))) == 4
        end
        # A finished run, run again: nothing more to do; weights.npz and metrics.jsonl rewritten.
        rm(joinpath(straight, "weights.npz"))
        code, text, _ = run_cli(train_args(inputs, init, straight, opts(4)...)...)
        @test code == 0 && startswith(text, "resume: from epoch 4\ndone: ") && isempty(metric_lines(text))
        @test same_arrays(npzread(joinpath(straight, "weights.npz")), npzread(joinpath(twice, "weights.npz")))
        # A checkpoint past --epochs, or of another network, is an error naming it.
        code, _, err = run_cli(train_args(inputs, init, straight, opts(3)...)...)
        @test code == 1 && occursin("checkpoint.npz: is at epoch 4, past --epochs 3", err)
        other = joinpath(dir, "other.npz")
        save_weights(other, init_weights(ArchSpec(8, 6, 1, 2, 3, [5]); seed=8))
        code, _, err = run_cli(train_args(inputs, other, straight, opts(4)...)...)
        @test code == 1 && occursin("checkpoint.npz: made for another network", err)
        @test count(==('\n'), err) == 1
    end
end

@testset "train: early stopping with patience" begin
    mktempdir() do dir
        # The validation images' labels are the opposite of what the pixels say, so every epoch
        # of learning makes val_loss worse: epoch 1 stays the best.
        a = write_source(joinpath(dir, "synthetic"), "synthetic"; shards=(12, 12), seed=5,
                         val_fraction=0.3, flip_val=true)
        init = write_init(dir; seed=1)
        args(out, epochs) = train_args(["synthetic=$a"], init, out, "--epochs", string(epochs),
            "--batch-size", "4", "--lr", "0.05", "--val-fraction", "0.3", "--patience", "2")
        out = joinpath(dir, "run")
        code, text, _ = run_cli(args(out, 20)...)
        @test code == 0
        ms = parse_metrics.(metric_lines(text))
        @test length(ms) == 3 && all(m -> m["best_epoch"] == 1, ms)
        @test ms[3]["val_loss"] > ms[2]["val_loss"] > ms[1]["val_loss"]
        @test occursin("done: stopped early after epoch 3 (2 epochs without a better val_loss)", text)
        ck = npzread(joinpath(out, "checkpoint.npz"))
        @test ck["state"][[2, 4, 5, 6]] == [3, 1, 2, 1]
        one = joinpath(dir, "one")
        @test run_cli(args(one, 1)...)[1] == 0
        @test same_arrays(npzread(joinpath(out, "weights.npz")), npzread(joinpath(one, "weights.npz")))
        # Run again: finished, so only the outputs are rewritten.
        code, text, _ = run_cli(args(out, 20)...)
        @test code == 0 && isempty(metric_lines(text)) && occursin("resume: from epoch 3", text)
    end
end

@testset "train: errors are one line" begin
    mktempdir() do dir
        a = write_source(joinpath(dir, "synthetic"), "synthetic"; shards=(6,))
        init = write_init(dir; seed=1)
        out = joinpath(dir, "run")
        wrong = joinpath(dir, "wrong")
        mkpath(wrong)
        write_shard(joinpath(wrong, "shard-00000.npz"); images=zeros(Float32, 6, 8, 1, 2))
        badlabel = joinpath(dir, "badlabel")
        mkpath(badlabel)
        write_shard(joinpath(badlabel, "shard-00000.npz"); images=zeros(Float32, 8, 6, 1, 3),
                    labels=Int64[0, 2, 1], ids=Int64[7, 8, 9])
        empty = joinpath(dir, "empty")
        mkpath(empty)
        write_shard(joinpath(empty, "shard-00000.npz"); images=zeros(Float32, 8, 6, 1, 0))
        nofiles = joinpath(dir, "nofiles")
        mkpath(nofiles)
        absent = joinpath(dir, "absent")
        for (args, expected) in (
                (train_args(["synthetic=$absent"], init, out), "$absent: no such folder"),
                (train_args(["synthetic=$nofiles"], init, out), "$nofiles: no shard-*.npz files"),
                (train_args(["synthetic"], init, out), "--input: expected NAME=DIR, got \"synthetic\""),
                (train_args(["=$a"], init, out), "--input: expected NAME=DIR"),
                (train_args(["s=$a", "s=$a"], init, out), "--input: source name \"s\" given twice"),
                (train_args(["s=$wrong"], init, out),
                 "$(joinpath(wrong, "shard-00000.npz")): images are (W, H, C) = (6, 8, 1)"),
                (train_args(["s=$badlabel"], init, out),
                 "$(joinpath(badlabel, "shard-00000.npz")): label 2 (image id 8) is outside 0..1"),
                (train_args(["s=$empty"], init, out), "--input: no training images"),
                (train_args(["s=$a"], joinpath(dir, "nope.npz"), out), "nope.npz: no such weights file"),
                (train_args(["s=$a"], init, out, "--flip", "2"), "--flip: must be 0 or 1"),
                (train_args(["s=$a"], init, out, "--lr", "-1"), "--lr: must be a number > 0"),
                (train_args(["s=$a"], init, out, "--beta2", "1"), "--beta2: must be a number in [0, 1)"),
                (train_args(["s=$a"], init, out, "--val-fraction", "x"), "--val-fraction: must be a number"),
                (train_args(["s=$a"], init, out, "--batch-size", "0"), "--batch-size: must be an integer >= 1"),
                (train_args(["s=$a"], init, out, "--frobnicate", "1"), "--frobnicate: unknown option for train"),
                (train_args(["s=$a"], init, out, "stray"), "stray: unexpected argument"),
                (["train", "--input", "s=$a", "--output", out], "--weights: is required"),
                (["train", "--weights", init, "--output", out], "--input: is required"),
                (["train", "--input", "s=$a", "--weights", init], "--output: is required"),
                (train_args(["s=$a"], init, init), "init.npz: exists and is not a folder"),
                (["@$(joinpath(dir, "none.args"))"], "none.args: no such response file"))
            code, stdout_text, err = run_cli(args...)
            @test code == 1
            @test err == "flux_model: error: $(first(split(err[20:end], '\n')))\n"
            @test count(==('\n'), err) == 1
            @test occursin(expected, err)
            occursin(expected, err) || println("unexpected error text: ", err)
        end
        @test !isdir(out)  # nothing was trained or written
        code, text, err = run_cli("train", "--help")
        @test code == 0 && occursin("--val-fraction", text) && err == ""
    end
end

@testset "response files (@PATH) in both modes" begin
    mktempdir() do dir
        a = write_source(joinpath(dir, "synthetic"), "synthetic"; shards=(6,))
        init = write_init(dir; seed=1)
        job = joinpath(dir, "job.args")
        out = joinpath(dir, "run with space")
        write(job, join(["train", "--input", "synthetic=$a", "", "--weights", init, "--output", out,
                         "--epochs", "1\r", "--val-fraction", "0", ""], "\n"))
        code, text, err = run_cli("@$job")
        @test code == 0 && err == "" && length(metric_lines(text)) == 1
        @test isfile(joinpath(out, "weights.npz"))
        @test M.expand_response_files(["x", "@$job", "y"])[1:3] == ["x", "train", "--input"]
        # Classify reads one too; the options after it still count.
        cargs = joinpath(dir, "classify.args")
        write(cargs, "--input\n$(joinpath(a, "shard-00000.npz"))\n--weights\n$init\n")
        code, text, err = run_cli("@$cargs", "--output", joinpath(dir, "pred"))
        @test code == 0 && occursin("summary: 6 images in 1 shards", text)
        @test isfile(joinpath(dir, "pred", "shard-00000.probs.npz"))
    end
end

@testset "serve: jobs from stdin in one process, a failed job leaves it working" begin
    mktempdir() do dir
        a = write_source(joinpath(dir, "synthetic"), "synthetic"; shards=(6,))
        init = write_init(dir; seed=1)
        job = joinpath(dir, "job.args")
        write(job, join(["train", "--input", "synthetic=$a", "--weights", init, "--output",
                         joinpath(dir, "run"), "--epochs", "1", "--val-fraction", "0"], "\n"))
        gray = ["--input", joinpath(GOLDEN, "gray"), "--weights",
                joinpath(GOLDEN, "gray", "weights.npz"), "--batch-size", "4", "--output"]
        lines = [join([gray; joinpath(dir, "p1")], '\t'),
                 join(["--input", joinpath(dir, "missing"), "--weights", init, "--output",
                       joinpath(dir, "p2")], '\t'),
                 "", "serve", "@$job\r",
                 join([gray; joinpath(dir, "p 3")], '\t')]
        out = IOBuffer()
        @test M.serve(IOBuffer(join(lines, "\n") * "\n"), out) == 0
        text = split(String(take!(out)), '\n')
        ends = filter(l -> startswith(l, M.SERVE_END), text)
        @test ends == ["flux_model serve: job $i exit $c" for (i, c) in enumerate((0, 1, 1, 0, 0))]
        # Each error line comes before its job's end line, on the same stream.
        bad = findfirst(l -> occursin("missing: no such file or folder", l), text)
        @test bad !== nothing && startswith(text[bad], "flux_model: error: ") &&
              text[bad + 1] == ends[2]
        @test any(l -> occursin("cannot start another server", l), text)
        @test isfile(joinpath(dir, "run", "weights.npz")) && !isdir(joinpath(dir, "p2"))
        for shard in shards_of("gray")  # the same bytes before and after the failures
            first_run = read(joinpath(dir, "p1", M.probs_name(shard)))
            @test read(joinpath(dir, "p 3", M.probs_name(shard))) == first_run
            got, expected = npzread(joinpath(dir, "p1", M.probs_name(shard))), expected_probs("gray", shard)
            @test maximum(abs.(got["probs"] .- expected["probs"])) <= expected["atol"][1]
        end
        @test M.job_words("a\tb c\r") == ["a", "b c"] && M.job_words(" \r") === nothing
    end
end

@testset "flux_model.jl: a sysimage's SynthFluxModel only while julia/src is unchanged" begin
    julia_dir = normpath(joinpath(@__DIR__, ".."))
    @test M.source_digest(joinpath(julia_dir, "src")) == M.SOURCE_DIGEST
    # This process holds Main.SynthFluxModel, as a julia started with the sysimage does.
    unchanged = Module()
    Base.include(unchanged, joinpath(julia_dir, "flux_model.jl"))
    @test unchanged.SynthFlux === M
    mktempdir() do dir
        cp(joinpath(julia_dir, "src"), joinpath(dir, "src"))
        cp(joinpath(julia_dir, "flux_model.jl"), joinpath(dir, "flux_model.jl"))
        write(joinpath(dir, "src", "notes.txt"), "not a source")
        @test M.source_digest(joinpath(dir, "src")) == M.SOURCE_DIGEST
        open(joinpath(dir, "src", "arch.jl"), "a") do io
            println(io, "# an edit")
        end
        @test M.source_digest(joinpath(dir, "src")) != M.SOURCE_DIGEST
        edited, log = Module(), joinpath(dir, "stderr.txt")
        open(log, "w") do io
            redirect_stderr(() -> Base.include(edited, joinpath(dir, "flux_model.jl")), io)
        end
        @test edited.SynthFlux !== M && edited.SynthFlux.SOURCE_DIGEST != M.SOURCE_DIGEST
        @test occursin("julia/src changed since the sysimage was built", read(log, String))
    end
end

@testset "golden training run from the PyTorch twin" begin
    gdir = joinpath(GOLDEN, "train")
    mktempdir() do dir
        out = joinpath(dir, "run")
        args = M.expand_response_files(["--input", "golden=$(joinpath(gdir, "data"))",
            "--weights", joinpath(gdir, "init.npz"), "--output", out, "@$(joinpath(gdir, "args.txt"))"])
        losses = Float64[]
        M.run_train(M.parse_train_args(args), IOBuffer(); hook=(e, s, l) -> push!(losses, l))
        expected = npzread(joinpath(gdir, "expected.npz"))
        rel(a, b) = maximum(abs.(Float64.(a) .- Float64.(b))) / maximum(abs.(Float64.(b)))
        @test length(losses) == length(expected["step_loss"])
        @test maximum(abs.(losses .- expected["step_loss"]) ./ abs.(expected["step_loss"])) <= 1e-4
        ck = npzread(joinpath(out, "checkpoint.npz"))
        h, eh = ck["history"], expected["history"]
        @test size(h, 1) == size(eh, 1)
        @test h[:, [1, 2, 4, 6]] == eh[:, [1, 2, 4, 6]]  # epochs, steps, accuracies
        @test maximum(abs.(h[:, [3, 5]] .- eh[:, [3, 5]]) ./ abs.(eh[:, [3, 5]])) <= 1e-4
        for k in sort!([k for k in keys(expected) if startswith(k, "weights_")])
            @test rel(ck[k[9:end]], expected[k]) <= 1e-4
        end
        if !isempty(get(ENV, "SYNTHFLUX_GOLDEN_REPORT", ""))
            println("golden: step losses ", maximum(abs.(losses .- expected["step_loss"]) ./ abs.(expected["step_loss"])),
                    "; history ", maximum(abs.(h[:, [3, 5]] .- eh[:, [3, 5]]) ./ abs.(eh[:, [3, 5]])),
                    "; weights ", join(("$(k[9:end]) $(rel(ck[k[9:end]], expected[k]))"
                                        for k in sort!([k for k in keys(expected) if startswith(k, "weights_")])), ", "))
        end
    end
end

end # testset
