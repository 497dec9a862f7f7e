"""The sm_90a report: every Triton kernel configuration a launcher can pick compiles, specialized
as a launch specializes it, with no spills, no ptxas performance advisory and HGMMA in every
GEMM-shaped kernel, except what vlkernels.report.EXCEPTIONS names with its reason."""
import inspect
import json
import os
import subprocess
import sys

import pytest

from vlkernels import report


@pytest.fixture(scope="module")
def report_rows():
    # A fresh process without TRITON_INTERPRET: the interpreter has no kernels to compile.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "vlkernels.report", "--json"], env=env,
                         capture_output=True, text=True, timeout=1500)
    rows = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert rows, f"the report printed no rows:\n{run.stdout}\n{run.stderr}"
    return rows


def test_every_kernel_of_every_op_is_reported(report_rows):
    from vlkernels import ops
    from vlkernels.ops import _attention_kernels, _mome_kernels, _optimal_transport_kernels

    defined = {name for module in (*ops.KERNEL_MODULES, _attention_kernels, _mome_kernels, _optimal_transport_kernels)
               for name, value in vars(module).items() if name.endswith("_kernel") and hasattr(value, "fn")}
    reported = {row["kernel"] for row in report_rows}
    assert defined and defined <= reported, f"kernels the report never compiles: {sorted(defined - reported)}"


def test_variants_are_named_uniquely(report_rows):
    keys = [(row["kernel"], row["variant"]) for row in report_rows]
    assert len(keys) == len(set(keys)), "two variants of one kernel share a label (the exceptions table keys on it)"


def test_no_variant_spills_carries_an_advisory_or_misses_hgmma(report_rows):
    bad = {f"{row['kernel']}[{row['variant']}]": report.unexcepted_problems(row) for row in report_rows
           if report.unexcepted_problems(row)}
    assert not bad, "fix these or list them in vlkernels.report.EXCEPTIONS with the reason:\n" + json.dumps(bad, indent=1)


def test_every_exception_is_still_needed(report_rows):
    failing = {(row["kernel"], row["variant"]) for row in report_rows if report.problems(row)}
    stale = sorted(set(report.EXCEPTIONS) - failing)
    assert not stale, f"EXCEPTIONS entries whose variant now passes (remove them): {stale}"


def test_ptxas_and_the_cubin_agree(report_rows):
    for row in report_rows:
        assert "error" not in row, f"{row['kernel']}[{row['variant']}]: {row['error']}"
        assert row["ptxas_registers"] == row["registers"], (
            f"{row['kernel']}[{row['variant']}]: ptxas -v says {row['ptxas_registers']} registers, the cubin "
            f"{row['registers']}: the report compiled it differently from Triton")


def test_variants_are_specialized_as_a_launch(report_rows):
    """Triton turns an int argument equal to 1 into a constant at launch; so must the report."""
    rows = {(row["kernel"], row["variant"]): row for row in report_rows}
    for variant in report.all_variants():
        parameters = inspect.signature(variant.kernel.fn).parameters
        # (a parameter with a type annotation keeps its type: Triton does not specialize it)
        ones = sorted(name for name, value in variant.scalars.items() if type(value) is int and value == 1
                      and name in parameters and parameters[name].annotation is inspect.Parameter.empty)
        assert sorted(rows[(variant.name, variant.label)]["constants"]) == ones, f"{variant.name}[{variant.label}]"


def test_problems_flags_spills_advisories_and_missing_hgmma():
    log = """ptxas info    : Compiling entry function 'k' for 'sm_90a'
ptxas info    : Function properties for k
    288 bytes stack frame, 284 bytes spill stores, 284 bytes spill loads
ptxas info    : (C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized due to non \
wgmma instructions defining accumulator registers of a wgmma between start and end of the pipeline stage in the \
function 'k'
ptxas warning : Registers are spilled to local memory in function 'k', 284 bytes spill stores, 284 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 288 bytes cumulative stack size"""
    row = dict(kernel="k", variant="v", expects_hgmma=True, hgmma=0, **report.parse_ptxas(log))
    assert row["ptxas_registers"] == 255 and row["stack_bytes"] == 288
    found = report.problems(row)
    assert found[0] == "spills (284 B stored, 284 B loaded)"
    assert found[1].startswith("ptxas: (C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized")
    assert found[2].startswith("ptxas: Registers are spilled to local memory")
    assert found[3] == "GEMM-shaped but its SASS has no HGMMA"
    clean = dict(row, spill_stores=0, spill_loads=0, advisories=[], hgmma=4)
    assert report.problems(clean) == []


def test_occupancy_follows_registers_shared_memory_and_warps():
    assert report.occupancy(255, 8, 0) == (1, "registers")  # 256 x 32 x 8 = all 64K registers
    assert report.occupancy(127, 4, 0) == (4, "registers")  # 128 regs: 16K per 4-warp CTA
    assert report.occupancy(64, 4, 100_000) == (2, "shared")  # two 100 KB CTAs in 228 KB
    assert report.occupancy(24, 4, 0) == (16, "warps")  # 64 warps per SM
    assert report.occupancy(16, 1, 0) == (32, "warps")  # at most 32 CTAs per SM


def test_attention_dq_kernel_fits_two_ctas_per_sm_at_head_dim_64(report_rows):
    """The FA2-form backward's dQ launch runs apart from dK/dV, so its programs get their own
    (smaller) register allocation: at least 2 resident CTAs per SM at Dh 64 (issue 14 item 8)."""
    rows = [row for row in report_rows if row["kernel"] in ("_attention_bwd_kernel", "_co_attention_bwd_kernel")
            and "-D64" in row["variant"] and row["variant"].endswith("-dq") and "ieee" not in row["variant"]]
    assert len(rows) >= 4, [row["variant"] for row in rows]
    for row in rows:
        assert row["ctas_per_sm"] >= 2, f"{row['kernel']}[{row['variant']}]: {row['ctas_per_sm']} CTA/SM"


def test_the_report_compiles_every_row_of_the_attention_configuration_table(report_rows):
    """Issue 14 item 5: each row of the launch-configuration table is compiled (and so clean or
    excepted, by the tests above), with the row's tiles, warps and stages."""
    import importlib

    from vlkernels.ops import _attention_configs as configs

    rows = {(row["kernel"], row["variant"]): row for row in report_rows}
    table, _ = importlib.import_module("vlkernels.ops.attention").table_variants()
    assert {key for key, _ in table} == set(configs.CONFIGS)
    for key, variant in table:
        row = rows[(variant.name, variant.label)]
        cfg = configs.CONFIGS[key]
        assert (row["num_warps"], row["num_stages"]) == (cfg.num_warps, cfg.num_stages), variant.label


SASS_WITH_TWO_LOOPS = """
        /*0000*/                   S2R R0, SR_CTAID.X ;                          /* 0x0000000000007919 */
        /*0010*/              @P0 EXIT ;                                         /* 0x000000000000094d */
        /*0020*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ, !UPT ;  /* 0x00e0000004187df0 */
        /*0030*/                   FMUL R2, R24, 0.5 ;                           /* 0x3f00000018027820 */
        /*0040*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24 ;  /* 0x00e0000008187df0 */
        /*0050*/                   IADD3 R3, R3, 0x40, RZ ;                      /* 0x0000004003037810 */
        /*0060*/                   ISETP.GE.AND P0, PT, R3, R4, PT ;             /* 0x000000040300720c */
        /*0070*/              @!P0 BRA 0x20 ;                                    /* 0xfffffffc00688947 */
        /*0080*/                   MUFU.EX2 R5, R2 ;                             /* 0x0000000200057308 */
        /*0090*/                   FMNMX R6, R5, R2, !PT ;                       /* 0x0000000205067209 */
        /*00a0*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR12], R24 ;  /* 0x00e000000c187df0 */
        /*00b0*/              @P1 BRA 0x90 ;                                     /* 0xfffffffc00f41947 */
        /*00c0*/                   IADD3 R3, R3, 0x40, RZ ;                      /* 0x0000004003037810 */
        /*00d0*/              @!P0 BRA 0x80 ;                                    /* 0xfffffffc00688947 */
        /*00e0*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;                 /* 0x0000000000007b1d */
        /*00f0*/              @P2 BRA 0xe0 ;                                     /* 0xfffffffc00f42947 */
        /*0100*/                   EXIT ;                                        /* 0x000000000000794d */
        /*0110*/                   BRA 0x110;                                    /* 0xfffffffc00fc7947 */
"""


def test_sass_loops_are_closed_by_backward_branches_and_dot_loops_are_the_innermost_with_hgmma():
    loops = report.sass_loops(SASS_WITH_TWO_LOOPS)
    # 0x20..0x70 (6 instructions), 0x80..0xd0 (6, two branches back to 0x80 and 0x90), 0x90..0xb0
    # nested in it, 0xe0..0xf0 (no HGMMA); a forward branch or the branch to itself closes none
    assert [(loop["start"], loop["end"], loop["instructions"], loop["hgmma"]) for loop in loops] == [
        (0x20, 0x70, 6, 2), (0x80, 0xd0, 6, 1), (0x90, 0xb0, 3, 1), (0xe0, 0xf0, 2, 0)]
    assert report.dot_loops(SASS_WITH_TWO_LOOPS) == [6, 3]  # the outer 0x80 loop holds the inner one
    assert report.dot_loops("") == []


# A TMA pipeline's loop (as Triton 3.6 lays it out for sm_90a): the barrier wait's retry sits out
# of line past the epilogue, entered by a forward branch from the loop and branching back into it.
SASS_WITH_A_WAIT_STUB = """
        /*0000*/                   S2R R0, SR_CTAID.X ;                          /* 0x0000000000007919 */
        /*0010*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR8+0x18000], R7 ;  /* 0x01800007ff0075a7 */
        /*0020*/              @!P0 BRA 0xa0 ;                                    /* 0x0000001400f48947 */
        /*0030*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR16].tnspB, R24 ;  /* 0x41e00000101879f0 */
        /*0040*/                   UTMALDG.2D [UR20], [UR16] ;                   /* 0x00000014100025b4 */
        /*0050*/              @!P1 BRA 0x10 ;                                    /* 0xfffffff800b08947 */
        /*0060*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR16].tnspB, R24 ;  /* 0x41e00000101879f0 */
        /*0070*/                   STG.E.U16 desc[UR4][R2.64], R24 ;             /* 0x0000000402007986 */
        /*0080*/                   EXIT ;                                        /* 0x000000000000794d */
        /*0090*/                   NOP ;                                         /* 0x0000000000007918 */
        /*00a0*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR8+0x18000], R7 ;  /* 0x01800007ff0075a7 */
        /*00b0*/              @!P0 BRA 0xa0 ;                                    /* 0xfffffffc00f88947 */
        /*00c0*/                   BRA 0x30 ;                                    /* 0xffffffe800007947 */
        /*00d0*/                   BRA 0xd0;                                     /* 0xfffffffc00fc7947 */
"""


def test_a_wait_retry_stub_that_branches_back_into_a_loop_closes_no_loop():
    loops = report.sass_loops(SASS_WITH_A_WAIT_STUB)
    # the loop 0x10..0x50 and the stub's own retry 0xa0..0xb0; 0xc0's branch back to 0x30 returns
    # into the loop (before, it made a 0x30..0xc0 "loop" holding the epilogue's HGMMA)
    assert [(loop["start"], loop["end"], loop["instructions"], loop["hgmma"]) for loop in loops] == [
        (0x10, 0x50, 5, 1), (0xa0, 0xb0, 2, 0)]
    assert report.dot_loops(SASS_WITH_A_WAIT_STUB) == [5]


# The forward's variants at Dh 64 under each mask (vlkernels.ops.attention table_variants): the
# default label has causal and key mask on, the suffixed ones the other masks.
_MASKED_FORWARDS = ("keymask", "causal", "")


def test_masked_forward_hot_loops_are_within_ten_percent_of_the_unmasked_one(report_rows):
    """Masks at no cost: at Dh 64, for every dtype the configuration table compiles with HGMMA,
    the forward's hot loop (the first HGMMA loop, over the key tiles every row sees whole) has
    within 10% of the unmasked variant's instructions under a key mask, causal, and both; the
    mask work sits in the second loop, over the partial tiles."""
    rows = {(row["kernel"], row["variant"]): row for row in report_rows}
    checked = []
    for (kernel, label), row in rows.items():
        if kernel not in ("_attention_fwd_kernel", "_co_attention_fwd_kernel") or not label.endswith("-D64-nomask"):
            continue
        base = label[: -len("-nomask")]
        unmasked = row["dot_loops"]
        assert len(unmasked) == 2, f"{kernel}[{label}]: HGMMA loops {unmasked} (a hot loop and a partial loop)"
        for suffix in _MASKED_FORWARDS if kernel == "_attention_fwd_kernel" else ("",):
            masked_label = f"{base}-{suffix}" if suffix else base
            masked = rows[(kernel, masked_label)]["dot_loops"]
            assert len(masked) == 2, f"{kernel}[{masked_label}]: HGMMA loops {masked}"
            assert masked[0] <= 1.1 * unmasked[0], (
                f"{kernel}[{masked_label}]: hot loop {masked[0]} instructions, unmasked {unmasked[0]}")
            checked.append(masked_label)
    dtypes = {label.split("-")[0] for label in checked}
    assert dtypes == {"bfloat16", "float16", "float32"}, checked


def test_backward_loops_by_tile_class_where_the_row_splits(report_rows):
    """A backward launch whose configuration row sets tile_classes compiles two HGMMA loops (the
    fully visible tiles with no mask work, then the partial ones), the others one. Where it is
    set it pays: the 16-bit dQ at Dh 64 fits 3 CTAs/SM (2 in one loop, single attention) and a
    split dQ's hot loop has at most 70% of the instructions of its partial loop."""
    import importlib

    table, _ = importlib.import_module("vlkernels.ops.attention").table_variants()
    rows = {(row["kernel"], row["variant"]): row for row in report_rows}
    split = []
    for _, variant in table:
        if "DQ" not in variant.constexprs:
            continue
        loops = rows[(variant.name, variant.label)]["dot_loops"]
        name = f"{variant.name}[{variant.label}]"
        if variant.constexprs["DOT_PRECISION"] == "ieee":  # FMA loops: no HGMMA to count
            assert not variant.constexprs["TILE_CLASSES"], name
            continue
        assert len(loops) == (2 if variant.constexprs["TILE_CLASSES"] else 1), f"{name}: HGMMA loops {loops}"
        if variant.constexprs["TILE_CLASSES"] and variant.constexprs["DQ"]:
            assert loops[0] <= 0.7 * loops[1], f"{name}: hot loop {loops[0]}, partial loop {loops[1]}"
            split.append(variant.label)
        if variant.constexprs["DQ"] and variant.label.split("-")[0] in ("bfloat16", "float16") and (
                variant.label.endswith("-D64-dq")):
            assert rows[(variant.name, variant.label)]["ctas_per_sm"] >= 3, name
    assert {"bfloat16-D64-dq", "float16-D64-dq", "float32-D64-dq"} <= set(split), split


def test_mome_layernorm_backward_keeps_16_warps_per_sm(report_rows):
    """The MoME LayerNorm backward's programs (about two per SM at the chunked schedule) run 8
    warps each with 2 CTAs resident per SM, in both schedules (one slot per expert, chunks)."""
    rows = [row for row in report_rows if row["kernel"] == "_mome_ln_bwd_kernel"]
    assert any("one-slot" in row["variant"] for row in rows) and any("one-slot" not in row["variant"] for row in rows)
    for row in rows:
        assert row["warps_per_sm"] >= 16, f"{row['variant']}: {row['ctas_per_sm']} CTA/SM of {row['num_warps']} warps"
