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
