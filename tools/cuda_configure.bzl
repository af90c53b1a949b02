"""Finds the CUDA toolkit and exposes it as @local_cuda.

Search order: $CUDA_PATH, /usr/local/cuda, then the directory of `nvcc` on $PATH. The generated
repository holds:
  //:cuda_runtime   headers plus static cudart, KVCACHE_HAVE_CUDA_RUNTIME=1 (empty when no toolkit)
  //:cuda_headers_lib  the toolkit's headers only, with KVCACHE_HAVE_CUDA_HEADERS=1, for host code
                       that uses host-callable CUDA headers such as cuda_fp8.h (empty without one)
  //:defs.bzl       CUDA_AVAILABLE, NVCC, CUDA_ARCHS
The architecture list defaults to 80,89,90 (native code for each, plus PTX for the newest) and is
overridden from the command line with --repo_env=KVCACHE_CUDA_ARCHS=90 (comma separated).

With --define=kvcache_cuda=off (//tools:cuda_off) a build behaves as if no toolkit were found:
cuda_runtime and cuda_headers_lib are empty and cuda_library builds its stub sources. The fuzz
configuration uses it: the fuzzer drives the CPU backend, and nvcc would otherwise compile every
kernel again in the fuzz build's own output tree.
"""

_DEFAULT_ARCHS = "80,89,90"

def _find_cuda(ctx):
    candidates = []
    if ctx.os.environ.get("CUDA_PATH"):
        candidates.append(ctx.os.environ["CUDA_PATH"])
    candidates.append("/usr/local/cuda")
    nvcc = ctx.which("nvcc")
    if nvcc:
        candidates.append(str(nvcc.dirname.dirname))
    for root in candidates:
        if ctx.path(root + "/bin/nvcc").exists and ctx.path(root + "/include/cuda_runtime.h").exists:
            return root
    return None

def _cuda_configure_impl(ctx):
    root = _find_cuda(ctx)
    archs = ctx.os.environ.get("KVCACHE_CUDA_ARCHS", _DEFAULT_ARCHS).replace(" ", "")
    if root == None:
        ctx.file("BUILD", """
package(default_visibility = ["//visibility:public"])
# No CUDA toolkit was found: the CUDA backend is built as a stub.
cc_library(name = "cuda_runtime")
cc_library(name = "cuda_headers_lib")
filegroup(name = "cuda_headers")
""")
        ctx.file("defs.bzl", "CUDA_AVAILABLE = False\nNVCC = \"\"\nCUDA_ARCHS = []\n")
        return
    ctx.symlink(root + "/include", "include")
    libdir = root + "/lib64"
    if not ctx.path(libdir + "/libcudart_static.a").exists:
        libdir = root + "/lib"
    ctx.symlink(libdir + "/libcudart_static.a", "lib/libcudart_static.a")
    ctx.file("BUILD", """
package(default_visibility = ["//visibility:public"])

# --define=kvcache_cuda=off: as if no toolkit were found.
alias(
    name = "cuda_runtime",
    actual = select({{
        "@//tools:cuda_off": ":no_cuda",
        "//conditions:default": ":cuda_runtime_lib",
    }}),
)

alias(
    name = "cuda_headers_lib",
    actual = select({{
        "@//tools:cuda_off": ":no_cuda",
        "//conditions:default": ":cuda_headers_only_lib",
    }}),
)

cc_library(name = "no_cuda")

# CUDA runtime headers and the static runtime library of the toolkit at {root}.
cc_library(
    name = "cuda_runtime_lib",
    srcs = ["lib/libcudart_static.a"],
    hdrs = glob(["include/**/*.h", "include/**/*.hpp"]),
    includes = ["include"],
    linkopts = ["-ldl", "-lrt", "-lpthread"],
    # Host code that calls the runtime directly (GPU tests, benchmarks) compiles only with this.
    defines = ["KVCACHE_HAVE_CUDA_RUNTIME=1"],
)

# Headers only (no cudart): host code may include host-callable headers such as cuda_fp8.h.
cc_library(
    name = "cuda_headers_only_lib",
    hdrs = glob(["include/**/*.h", "include/**/*.hpp", "include/nv/**"]),
    includes = ["include"],
    defines = ["KVCACHE_HAVE_CUDA_HEADERS=1"],
)

filegroup(
    name = "cuda_headers",
    srcs = glob(["include/**/*.h", "include/**/*.hpp"]),
)
""".format(root = root))
    ctx.file("defs.bzl", "CUDA_AVAILABLE = True\nNVCC = \"{}\"\nCUDA_ARCHS = {}\n".format(
        root + "/bin/nvcc",
        repr([a for a in archs.split(",") if a]),
    ))

cuda_configure = repository_rule(
    implementation = _cuda_configure_impl,
    environ = ["CUDA_PATH", "PATH", "KVCACHE_CUDA_ARCHS"],
    local = True,
)
