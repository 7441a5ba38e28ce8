# Tests of SynthFluxModel: random inputs, the golden files written by the PyTorch reference
# (tests/fixtures/golden, see make_golden.py there), weights/shard I/O, the CLI and its errors.
#
#   julia --project=julia julia/test/runtests.jl      (or: julia --project=julia -e 'using Pkg; Pkg.test()')

using Test
using NPZ: npzread, npzwrite

include(joinpath(@__DIR__, "..", "src", "SynthFluxModel.jl"))
using .SynthFluxModel
const M = SynthFluxModel

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

end # testset
