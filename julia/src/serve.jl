# `flux_model.jl serve`: many jobs in one Julia process, so Flux is loaded and the model's code
# compiled once per `synthflux run` instead of once per job.
#
# stdin: one job a line, its arguments separated by tabs, exactly the words of a one-shot
# `flux_model.jl ...` command line (so `@PATH` response files work too). stdout: the job's own
# output, its error line included (`flux_model: error: ...`, written to stdout here so that it
# comes before the end line), then one end line:
#
#     flux_model serve: job N exit C
#
# N counts the jobs from 1, C is the code the one-shot command would have exited with. A failed
# job leaves the server as it was (nothing but the job's files is touched), so the next job
# runs. The server exits 0 when stdin ends.

const SERVE_END = "flux_model serve: job"

"""The arguments of one job line (tab-separated; a trailing `\\r` dropped), or `nothing`."""
function job_words(line::AbstractString)
    line = rstrip(line, ['\r', '\n'])
    isempty(strip(line)) && return nothing
    return String.(split(line, '\t'))
end

"""
    serve(input=stdin, out=stdout) -> 0

Run each job line of `input` through [`main`](@ref), in this process, and answer each with its
end line on `out`. Jobs run one after another; `serve` inside a job is refused.
"""
function serve(input::IO=stdin, out::IO=stdout)
    n = 0
    for line in eachline(input)
        words = job_words(line)
        words === nothing && continue
        n += 1
        code = if !isempty(words) && words[1] == "serve"
            println(out, "flux_model: error: serve: a job cannot start another server")
            1
        else
            main(words; out=out, err=out)
        end
        GC.gc(false)  # the job's arrays go now, not during the next job's timing
        println(out, SERVE_END, " ", n, " exit ", code)
        flush(out)
    end
    return 0
end
