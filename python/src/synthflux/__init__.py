"""synthflux: class descriptions -> synthetic images -> .npz shards -> a Flux.jl classifier."""

__version__ = "0.1.0"
