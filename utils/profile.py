"""One window of work under ``torch.profiler``: its Chrome trace, and where the time went.

On CUDA the summary says how busy the GPU was during the window and how many kernels
and graphs the host launched: a GPU busy well under 100% with hundreds of launches a
step waits on the host, which is what a captured step (utils/step.py) removes. On
the CPU it gives the operators that took the most time.
"""
import time

from torch.profiler import ProfilerActivity, profile

from .device import synchronize

LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx", "cudaGraphLaunch")


def _self_time(event, cuda: bool) -> float:
    """Microseconds the event itself took on the device (CUDA) or on the CPU."""
    if not cuda:
        return event.self_cpu_time_total
    return getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)


def profile_window(window, device, path, top: int = 8) -> dict:
    """Run ``window()`` once under the profiler, write the trace to ``path``, return the summary:
    wall seconds, device-busy seconds (CUDA; None elsewhere), launches and the ``top`` operators
    or kernels by their own time, each with its share of the total."""
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    synchronize(device)
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        window()
        synchronize(device)
        wall = time.perf_counter() - start
    prof.export_chrome_trace(str(path))
    events = [e for e in prof.key_averages() if e.key not in LAUNCHES and _self_time(e, cuda) > 0]
    total = sum(_self_time(e, cuda) for e in events)
    ranked = sorted(events, key=lambda e: _self_time(e, cuda), reverse=True)[:top]
    return {"wall_s": wall, "device_busy_s": total / 1e6 if cuda else None,
            "launches": sum(e.count for e in prof.key_averages() if e.key in LAUNCHES),
            "top": [{"name": e.key, "seconds": _self_time(e, cuda) / 1e6, "share": _self_time(e, cuda) / total}
                    for e in ranked]}


def summary_line(name: str, summary: dict, steps: int) -> str:
    """One line of a profile summary, for bench.py's printout."""
    busy = summary["device_busy_s"]
    gpu = (f"GPU busy {busy:.3f} s ({busy / summary['wall_s']:.0%}), "
           f"{summary['launches'] / steps:.0f} launches a step; " if busy is not None else "")
    tops = ", ".join(f"{t['name'][:40]} {t['share']:.0%}" for t in summary["top"][:4])
    return f"profile {name}: {summary['wall_s']:.3f} s for {steps} steps; {gpu}top: {tops}"
