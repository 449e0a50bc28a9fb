"""Turn the Metal source MLX generates for a `metal_kernel` call into a C++ translation unit.

The input is the exact text MLX would hand to the Metal compiler (see `_source.py`):
`header`, an optional `template <...>` line, the `[[kernel]] void custom_kernel_...(...)` signature
with `[[buffer(i)]]` and attribute parameters, the body, and for templated kernels an explicit
instantiation line. The output is `#include "msl_shim.h"`, the same text with line-preserving
rewrites (so compiler messages and runtime reports point at lines of the generated source), and a
harness that binds buffers and per-thread attributes and exports `emu_kernel_launch`.
"""

from __future__ import annotations

import dataclasses
import json
import re

from ._errors import EmulatorCompileError

# Attribute parameters MLX can inject (mlx/backend/common/metal_kernel.cpp) -> harness expression.
_UINT3 = {
    "thread_position_in_grid": "thread_position_in_grid",
    "thread_position_in_threadgroup": "thread_position_in_threadgroup",
    "threadgroup_position_in_grid": "threadgroup_position_in_grid",
    "threads_per_threadgroup": "threads_per_threadgroup",
    "dispatch_threads_per_threadgroup": "dispatch_threads_per_threadgroup",
    "threads_per_grid": "threads_per_grid",
    "threadgroups_per_grid": "threadgroups_per_grid",
    "grid_size": "threads_per_grid",
}
_UINT = {
    "thread_index_in_threadgroup": "c->thread_index_in_threadgroup",
    "thread_index_in_simdgroup": "c->thread_index_in_simdgroup",
    "simdgroup_index_in_threadgroup": "c->simdgroup_index_in_threadgroup",
    "simdgroups_per_threadgroup": "c->simdgroups_per_threadgroup",
    "dispatch_simdgroups_per_threadgroup": "c->dispatch_simdgroups_per_threadgroup",
    "thread_index_in_quadgroup": "c->thread_index_in_quadgroup",
    "quadgroup_index_in_threadgroup": "c->quadgroup_index_in_threadgroup",
    "quadgroups_per_threadgroup": "c->quadgroups_per_threadgroup",
    "dispatch_quadgroups_per_threadgroup": "c->dispatch_quadgroups_per_threadgroup",
    "threads_per_simdgroup": "32u",
    "thread_execution_width": "32u",
}
ATTRIBUTES = frozenset(_UINT3) | frozenset(_UINT) | {"grid_origin"}

# MLX dtype name in generated source -> (itemsize)
TYPE_SIZES = {
    "bool": 1, "uint8_t": 1, "uint16_t": 2, "uint32_t": 4, "uint64_t": 8, "int8_t": 1,
    "int16_t": 2, "int32_t": 4, "int64_t": 8, "float16_t": 2, "bfloat16_t": 2, "float": 4,
    "complex64_t": 8, "int": 4, "uint": 4, "half": 2,
}


@dataclasses.dataclass(frozen=True)
class BufferParam:
    index: int  # [[buffer(index)]]
    name: str
    ctype: str  # element type without address space / const, e.g. "float", "atomic<float>"
    is_const: bool
    space: str  # "device" | "constant"
    is_ref: bool  # `constant T&` (0-d input / scalar)

    @property
    def itemsize(self) -> int:
        m = re.fullmatch(r"atomic<(\w+)>", self.ctype)
        return TYPE_SIZES.get(m.group(1) if m else self.ctype, 4)


@dataclasses.dataclass(frozen=True)
class AttrParam:
    name: str
    ctype: str  # "uint" | "uint3"


@dataclasses.dataclass(frozen=True)
class ParsedKernel:
    func_name: str  # custom_kernel_<name>_...
    template_args: str  # "<float, 128, 1>" or ""
    buffers: tuple[BufferParam, ...]
    attrs: tuple[AttrParam, ...]


_SIG_RE = re.compile(r"\[\[kernel\]\]\s+void\s+(custom_kernel_\w+)\s*\(\n")
_BUF_RE = re.compile(
    r"^\s*(?P<const>const\s+)?(?P<space>device|constant)\s+(?P<type>[\w:<>]+)\s*(?P<ref>[*&])\s*"
    r"(?P<name>\w+)\s*\[\[buffer\((?P<idx>\d+)\)\]\]\s*$")
_ATTR_RE = re.compile(r"^\s*(?P<type>uint3?|ushort3?|uint2|ushort2|ushort)\s+(?P<name>\w+)\s*\[\[(?P<attr>\w+)\]\]\s*$")
_INST_RE = re.compile(r"template\s+\[\[host_name\(\"(\w+)\"\)\]\]\s+\[\[kernel\]\]\s+decltype\((\w+)(<.*?>)\)")


def parse_signature(src: str) -> ParsedKernel:
    matches = list(_SIG_RE.finditer(src))
    if not matches:
        raise EmulatorCompileError("no `[[kernel]] void custom_kernel_...(` signature in the generated source")
    m = matches[-1]
    end = src.find(") {\n", m.end())
    if end < 0:
        raise EmulatorCompileError("unterminated kernel signature in the generated source")
    params = src[m.end():end].split(",\n")
    buffers, attrs = [], []
    for p in params:
        b = _BUF_RE.match(p)
        if b:
            buffers.append(BufferParam(int(b["idx"]), b["name"], b["type"], bool(b["const"]), b["space"],
                                       b["ref"] == "&"))
            continue
        a = _ATTR_RE.match(p)
        if a and a["attr"] in ATTRIBUTES and a["name"] == a["attr"]:
            attrs.append(AttrParam(a["name"], a["type"]))
            continue
        raise EmulatorCompileError(f"unsupported kernel parameter in the generated signature: {p.strip()!r}")
    if [b.index for b in buffers] != list(range(len(buffers))):
        raise EmulatorCompileError("buffer indices of the generated signature are not 0..n-1 in order")
    inst = _INST_RE.search(src, end)
    targs = inst.group(3) if inst and inst.group(2) == m.group(1) else ""
    return ParsedKernel(m.group(1), targs, tuple(buffers), tuple(attrs))


# ------------------------------------------------------------------ rewrites ----
_TG_DECL_RE = re.compile(
    r"(?<![\w.])threadgroup\s+(?P<type>(?:[\w:]+(?:\s*<[^;{}()]*?>)?\s+)*?[\w:]+(?:\s*<[^;{}()]*?>)?)\s+"
    r"(?P<name>[A-Za-z_]\w*)\s*(?P<dims>(?:\[[^\];]+\]\s*)*);")
_TG_TOKEN_RE = re.compile(r"(?<![\w.])threadgroup(?!\w)")
_LITERAL_RE = re.compile(r"(?<![\w.])((?:\d+\.\d*|\.\d+|\d+)(?:[eE][+-]?\d+)?)(h|bf)\b")
_METAL_INCLUDE_RE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*(<metal_\w+>|"mlx/backend/metal/kernels/[\w/.]+")[^\n]*$',
                               re.M)
_ATTR_STRIP_RE = re.compile(r"\[\[\s*(?:buffer\(\d+\)|host_name\(\"[^\"]*\"\)|max_total_threads_per_threadgroup\(\d+\)|"
                            + "|".join(sorted(ATTRIBUTES)) + r")\s*\]\]")


def _strip_comments_keep_lines(src: str) -> str:
    """Replace comments and string literals by spaces (newlines kept), for scanning only."""
    out = []
    i, n = 0, len(src)
    while i < n:
        c = src[i]
        if src.startswith("//", i):
            j = src.find("\n", i)
            j = n if j < 0 else j
            out.append(" " * (j - i))
            i = j
        elif src.startswith("/*", i):
            j = src.find("*/", i + 2)
            j = n if j < 0 else j + 2
            out.append(re.sub(r"[^\n]", " ", src[i:j]))
            i = j
        elif c == '"':
            j = i + 1
            while j < n and src[j] != '"':
                j += 2 if src[j] == "\\" else 1
            out.append('"' + " " * (min(j, n) - i - 1) + ('"' if j < n else ""))
            i = j + 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def rewrite(src: str) -> str:
    """Line-preserving MSL -> C++ rewrites. Raises EmulatorCompileError for unsupported forms."""
    src = _METAL_INCLUDE_RE.sub("", src)
    src = _ATTR_STRIP_RE.sub("", src)
    src = src.replace("[[kernel]]", "EMU_KERNEL")
    # explicit instantiation: `template EMU_KERNEL decltype(f<..>) f<..>;` -> plain C++
    src = re.sub(r"\btemplate\s+EMU_KERNEL\s+decltype", "template decltype", src)
    scan = _strip_comments_keep_lines(src)

    # threadgroup declarations -> per-threadgroup storage (fresh and poisoned per group)
    pieces, pos, site = [], 0, 0
    for m in _TG_DECL_RE.finditer(scan):
        typ = re.sub(r"\s+", " ", m["type"]).strip()
        dims = "".join(re.findall(r"\[[^\]]+\]", m["dims"]))
        pieces.append(src[pos:m.start()])
        decl = f'auto& {m["name"]} = ::emu::tg_alloc<{typ}{dims}>({site}u, "{m["name"]}");'
        original = src[m.start():m.end()]
        decl += "\n" * original.count("\n")
        pieces.append(decl)
        pos = m.end()
        site += 1
    pieces.append(src[pos:])
    src = "".join(pieces)

    # Remaining `threadgroup` must qualify a pointer or reference (e.g. function parameters).
    scan = _strip_comments_keep_lines(src)
    for m in _TG_TOKEN_RE.finditer(scan):
        rest = scan[m.end():]
        stop = re.search(r"[;,)=({]", rest)
        seg = rest[:stop.start()] if stop else rest
        if "*" not in seg and "&" not in seg:
            line = scan.count("\n", 0, m.start()) + 1
            raise EmulatorCompileError(
                f"line {line} of the generated source: unsupported `threadgroup` declaration "
                f"{src.splitlines()[line - 1].strip()!r}: only `threadgroup T name[N]...;` (one name, no "
                "initialiser) and `threadgroup T*`/`threadgroup T&` are supported")

    # half / bfloat literals: 1.0h -> half(1.0f), 2bf -> bfloat(2.0f)
    def lit(m: re.Match) -> str:
        num = m.group(1)
        if not any(ch in num for ch in ".eE"):
            num += ".0"
        return f"{'half' if m.group(2) == 'h' else 'bfloat'}({num}f)"

    scan = _strip_comments_keep_lines(src)
    pieces, pos = [], 0
    for m in _LITERAL_RE.finditer(scan):
        pieces.append(src[pos:m.start()])
        pieces.append(lit(m))
        pos = m.end()
    pieces.append(src[pos:])
    return "".join(pieces)


def _c_string(s: str) -> str:
    return json.dumps(s)  # a valid C string literal for printable text; non-ASCII escaped as \uXXXX


def _c_string_bytes(s: str) -> str:
    out = ['"']
    for ch in s.encode("utf-8"):
        c = chr(ch)
        if c == '"' or c == "\\":
            out.append("\\" + c)
        elif 32 <= ch < 127 and c != "?":
            out.append(c)
        else:
            out.append(f"\\{ch:03o}")
    out.append('"')
    return "".join(out)


def translation_unit(src: str, display_name: str, buffer_names: list[str] | None = None) -> tuple[str, ParsedKernel]:
    """The full C++ source of a kernel .so for MLX-generated `src`."""
    parsed = parse_signature(src)
    body = rewrite(src)
    file_name = re.sub(r"[^\w.-]", "_", display_name) + ".metal"
    args = []
    for b in parsed.buffers:
        const = "const " if b.is_const else ""
        if b.is_ref:
            args.append(f"*({const}{b.ctype}*)b[{b.index}]")
        else:
            args.append(f"({const}{b.ctype}*)b[{b.index}]")
    for a in parsed.attrs:
        if a.name == "grid_origin":
            args.append("uint3(0u, 0u, 0u)")
        elif a.name in _UINT3:
            f = _UINT3[a.name]
            args.append(f"{a.ctype}(c->{f}[0], c->{f}[1], c->{f}[2])")
        else:
            args.append(f"{a.ctype}({_UINT[a.name]})")
    names = buffer_names or [b.name for b in parsed.buffers]
    lines = [""] + src.split("\n")
    nl = ",\n      "
    harness = f"""
#line 1 "emu_harness.cpp"
namespace {{
const char* const emu_src_lines[] = {{{", ".join(_c_string_bytes(x) for x in lines)}}};
const char* const emu_buf_names[] = {{{", ".join(_c_string_bytes(x) for x in names) or '""'}}};
const ::emu::rt::KernelMeta emu_meta = {{{_c_string_bytes(parsed.func_name)}, {_c_string_bytes(display_name)},
    {len(parsed.buffers)}u, emu_buf_names, {_c_string_bytes(file_name)}, emu_src_lines, {len(lines)}u}};
EMU_NOSAN void emu_body(void* const* b, const ::emu::rt::ThreadCtx* c) {{
  (void)b; (void)c;
  {parsed.func_name}{parsed.template_args}(
      {nl.join(args)});
}}
}}  // namespace
extern "C" __attribute__((visibility("default"))) int emu_kernel_launch(emu_launch* L) {{
  return ::emu::rt::run(L, emu_body, &emu_meta);
}}
extern "C" __attribute__((visibility("default"))) const char* emu_kernel_info(void) {{
  return {_c_string_bytes(display_name + chr(10) + str(len(parsed.buffers)) + chr(10) + "".join(n + chr(10) for n in names))};
}}
"""
    tu = (
        '#include "msl_shim.h"\n'
        "#define EMU_KERNEL __attribute__((noinline))\n"
        f'#line 1 {_c_string_bytes(file_name)}\n' + body + "\n" + harness
    )
    return tu, parsed
