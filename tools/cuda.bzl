"""cuda_library: compiles .cu files with nvcc and wraps the objects in a cc_library.

Every .cu file is compiled by a genrule with `nvcc -O3 -std=c++17`, native code for each architecture
in CUDA_ARCHS and PTX for the newest, and linked with the toolkit's static cudart. Without a toolkit
the target is built from `stub_srcs` instead: plain C++ that reports "built without CUDA support" at
run time, so everything that depends on it builds and tests unchanged. So is it under
--define=kvcache_cuda=off (//tools:cuda_off; tools/cuda_configure.bzl).
"""

load("@local_cuda//:defs.bzl", "CUDA_ARCHS", "CUDA_AVAILABLE", "NVCC")

def _gencode_flags():
    flags = []
    for arch in CUDA_ARCHS:
        flags.append("-gencode=arch=compute_{a},code=sm_{a}".format(a = arch))
    if CUDA_ARCHS:
        flags.append("-gencode=arch=compute_{a},code=compute_{a}".format(a = CUDA_ARCHS[-1]))
    return " ".join(flags)

def cuda_library(name, srcs, hdrs = [], deps = [], stub_srcs = [], nvcc_hdrs = [], **kwargs):
    """A C++ library whose .cu sources are compiled by nvcc.

    Args:
      name: target name.
      srcs: .cu files (and optional .cc files, compiled by the host compiler).
      hdrs: public headers of the library.
      deps: cc_library dependencies (their headers are visible to nvcc through nvcc_hdrs).
      stub_srcs: host C++ sources used instead of `srcs` when no CUDA toolkit is present.
      nvcc_hdrs: headers (files or filegroups) that the .cu files include, besides `hdrs`.
      **kwargs: passed to the cc_library (visibility, testonly, ...).
    """
    if not CUDA_AVAILABLE:
        native.cc_library(
            name = name,
            srcs = stub_srcs,
            hdrs = hdrs,
            deps = deps,
            **kwargs
        )
        return
    objs = []
    cc_srcs = []
    for src in srcs:
        if not src.endswith(".cu"):
            cc_srcs.append(src)
            continue
        obj = "_objs_cuda/{}/{}.o".format(name, src[:-3])
        cmd = ("{nvcc} -O3 -std=c++17 -Xcompiler=-fPIC,-Wall -Werror=all-warnings -diag-suppress=2810 " +
               "{gencode} -I. -I$(GENDIR) {{defines}}-c $(location {src}) -o $@").format(
            nvcc = NVCC,
            gencode = _gencode_flags(),
            src = src,
        )
        native.genrule(
            name = "{}_{}_nvcc".format(name, src[:-3].replace("/", "_")),
            srcs = [src] + hdrs + nvcc_hdrs + ["@local_cuda//:cuda_headers"],
            outs = [obj],
            # Like the host compiler under -c opt, nvcc drops assert() and debug-only checks.
            cmd = select({
                "//tools:opt": cmd.format(defines = "-DNDEBUG "),
                "//conditions:default": cmd.format(defines = ""),
            }),
            message = "nvcc " + src,
            testonly = kwargs.get("testonly", False),
        )
        objs.append(obj)
    native.cc_library(
        name = name,
        srcs = select({
            "//tools:cuda_off": stub_srcs,
            "//conditions:default": objs + cc_srcs,
        }),
        hdrs = hdrs,
        deps = deps + ["@local_cuda//:cuda_runtime"],
        alwayslink = True,
        **kwargs
    )
