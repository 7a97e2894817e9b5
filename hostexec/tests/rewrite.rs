//! The build script's rewrite of preprocessed units (build_support/rewrite.rs).

#[path = "../build_support/rewrite.rs"]
mod rewrite;

use rewrite::{c_string, rewrite};

#[test]
fn kernels_are_collected_and_their_markers_removed() {
    let text = "static void helper(); __mole_hx_global__ void k_f32(const float* x);\n\
                extern \"C\" __mole_hx_global__ void k_f32(const float* x) { }\n\
                __mole_hx_global__ void other ( int n ) {}";
    let (out, names) = rewrite(text).unwrap();
    assert_eq!(names, ["k_f32", "other"]);
    assert!(!out.contains("__mole_hx") && !out.contains("extern \"C\""), "{out}");
    assert!(rewrite("__mole_hx_global__ int bad() {}").unwrap_err().contains("MOLE_GLOBAL void name"));
}

#[test]
fn dynamic_shared_memory_becomes_a_pointer_to_the_runtime_region() {
    let (out, _) =
        rewrite("void f() { extern __mole_hx_shared__ __attribute__((aligned(16))) unsigned char smem[]; }").unwrap();
    // Attributes (`__align__`) go: the region is page-aligned.
    assert_eq!(
        out,
        "void f() { unsigned char *const smem = reinterpret_cast<unsigned char *>(::mole_host::dynamic_shared()); }"
    );
    assert!(rewrite("extern __mole_hx_shared__ float s[4];").unwrap_err().contains("unknown size"));
}

#[test]
fn static_shared_variables_become_references_into_the_arena() {
    let (out, _) =
        rewrite("void f() { static __mole_hx_shared__ volatile float s[32][8]; __mole_hx_shared__ int n; }").unwrap();
    assert_eq!(
        out,
        "void f() { using mole_hx_shared_0_t = volatile float [32][8]; static mole_hx_shared_0_t *const \
         mole_hx_shared_0 = static_cast<mole_hx_shared_0_t *>(::mole_host::static_shared(sizeof(mole_hx_shared_0_t))); \
         mole_hx_shared_0_t &s = *mole_hx_shared_0; using mole_hx_shared_1_t = int ; static mole_hx_shared_1_t *const \
         mole_hx_shared_1 = static_cast<mole_hx_shared_1_t *>(::mole_host::static_shared(sizeof(mole_hx_shared_1_t))); \
         mole_hx_shared_1_t &n = *mole_hx_shared_1; }"
    );
    for bad in ["__mole_hx_shared__ float a, b;", "__mole_hx_shared__ float a = 0;", "__mole_hx_shared__ float;"] {
        assert!(rewrite(bad).unwrap_err().contains("unsupported __shared__ declaration"), "{bad}");
    }
}

#[test]
fn c_strings_escape_everything_but_printable_ascii() {
    assert_eq!(c_string("a\"b\\c?\n\u{e9}"), "\"a\\\"b\\\\c\\?\\012\\303\\251\"");
}
