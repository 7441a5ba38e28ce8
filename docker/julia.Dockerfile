# The Julia image: julia/flux_model.jl (the classify stage's CNN), Flux and NPZ precompiled.
#
#   docker build -f docker/julia.Dockerfile -t synthflux-julia .        (or: make images)
#
# Its contract with the classify driver (python/src/synthflux/backends/docker.py, docs/classify.md): the ENTRYPOINT
# below, so the command is only flux_model.jl's own arguments (--input/--weights/--output/
# --batch-size); the data is mounted under /data; it runs as any non-root uid with no
# network and no capabilities, so the depot is world-readable and fully precompiled here.
ARG BASE_IMAGE=julia:1.10
FROM ${BASE_IMAGE}

# 1 (the default): also build a PackageCompiler sysimage of Flux, NPZ and SynthFluxModel, with
# the code that the warm-up (classify and one training epoch) runs compiled into it: a slower
# build (tens of minutes) and a bigger image, for a julia that starts training at once
# (julia/README.md "Start-up"). 0: no sysimage.
ARG SYSIMAGE=1
# Precompile for several x86-64 CPU generations. Without it code is compiled for the build
# machine's CPU and every container on another CPU recompiles at start (docker-library/julia#79).
# On arm64 pass e.g. "generic;cortex-a57;thunderx2t99;carmel".
ARG JULIA_CPU_TARGET="generic;sandybridge,-xsaveopt,clone_all;haswell,-rdrnd,base(1)"
# The same non-root ids as the Python image, so both write the shared data volume.
ARG UID=1000
ARG GID=1000

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
USER 0:0
# Run time: a writable scratch depot in /tmp first (logs, anything Julia must still compile),
# then the read-only one precompiled below. The build's RUNs write to the second one only
# (BUILD_DEPOT). A `julia` wrapper in /opt/synthflux/bin, if SYSIMAGE=1 made one, comes first.
ENV JULIA_CPU_TARGET=${JULIA_CPU_TARGET} \
    JULIA_DEPOT_PATH=/tmp/julia-depot:/opt/synthflux/depot \
    PATH=/opt/synthflux/bin:$PATH
WORKDIR /data
ENTRYPOINT ["julia", "--project=/opt/synthflux/julia", "/opt/synthflux/julia/flux_model.jl"]
CMD ["--help"]

RUN groupadd --non-unique --gid "$GID" synthflux \
    && useradd --non-unique --uid "$UID" --gid "$GID" --create-home --shell /bin/bash synthflux \
    && mkdir -p /data /opt/synthflux/julia /opt/synthflux/bin \
    && chown "$UID:$GID" /data

# Dependencies first (Project.toml, and Manifest.toml when one is committed), so this slow
# layer is rebuilt only when they change. The project's own src/ is not there yet, hence no
# automatic precompilation of the project and the dependencies precompiled by name.
ARG BUILD_DEPOT=/opt/synthflux/depot
COPY julia/Project.toml julia/Manifest.toml* /opt/synthflux/julia/
RUN JULIA_DEPOT_PATH=$BUILD_DEPOT JULIA_PKG_PRECOMPILE_AUTO=0 julia --project=/opt/synthflux/julia \
        -e 'using Pkg; Pkg.instantiate(); Pkg.precompile(["Flux", "NPZ"]); using Flux, NPZ'

COPY julia/flux_model.jl /opt/synthflux/julia/
COPY julia/src/ /opt/synthflux/julia/src/
COPY docker/julia-warmup.jl /opt/synthflux/warmup.jl
COPY docker/julia-sysimage.jl /opt/synthflux/sysimage.jl
# The sysimage is reached through the `julia` wrapper on PATH, so the ENTRYPOINT (the driver's
# contract) is the same with and without it: the warm-up traced, then the methods it ran compiled
# into the sysimage with SynthFluxModel (sysimage.jl). The warm-up then classifies a random shard.
RUN export JULIA_DEPOT_PATH=$BUILD_DEPOT SYNTHFLUX_JULIA_DIR=/opt/synthflux/julia \
        SYNTHFLUX_TRACE=/tmp/warmup-trace.jl \
    && if [ "$SYSIMAGE" = 1 ]; then \
        julia --project=/opt/synthflux/julia --trace-compile="$SYNTHFLUX_TRACE" \
            /opt/synthflux/warmup.jl \
        && julia -e 'using Pkg; Pkg.activate(temp=true); Pkg.add("PackageCompiler"); \
                  using PackageCompiler; Pkg.activate("/opt/synthflux/julia"); \
                  create_sysimage([:Flux, :NPZ]; sysimage_path="/opt/synthflux/sysimage.so", \
                                  script="/opt/synthflux/sysimage.jl", \
                                  cpu_target=ENV["JULIA_CPU_TARGET"])' \
        && rm "$SYNTHFLUX_TRACE" \
        && real="$(command -v julia)" \
        && printf '#!/bin/sh\nexec %s -J/opt/synthflux/sysimage.so "$@"\n' "$real" \
            > /opt/synthflux/bin/julia \
        && chmod 755 /opt/synthflux/bin/julia; \
    fi \
    && julia --project=/opt/synthflux/julia /opt/synthflux/warmup.jl \
    && chmod -R a+rX /opt/synthflux

USER ${UID}:${GID}
