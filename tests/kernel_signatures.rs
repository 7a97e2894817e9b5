//! Every kernel description ([`mole::kernels::exec::KernelDesc`]) against the kernel's C++ signature as
//! the CPU execution layer compiled it: the parameter struct's size first, then one pointer per
//! described argument, each to elements of the described size, `const` exactly for inputs.
//! Argument order among same-typed pointers is what the execution tests check (they run the
//! launch path and compare with the reference).

use mole::kernels::exec::Access;
use mole::kernels::Family;
use mole_hostexec::Kernel;

#[test]
fn descriptions_match_the_compiled_signatures() {
    let mut checked = 0;
    for family in Family::ALL {
        for build in family.default_builds() {
            let dtype = build.dtype;
            for desc in build.kernels() {
                let name = desc.entry_name(dtype);
                let kernel =
                    Kernel::find(family.source_file(), dtype.name(), &name).unwrap_or_else(|e| panic!("{name}: {e}"));
                let params = kernel.params();
                assert_eq!(params.len(), 1 + desc.args.len(), "{name}: parameter count");
                assert_eq!(params[0].size, desc.params_bytes, "{name}: {} size", desc.params_type);
                assert_eq!(params[0].pointee_size, None, "{name}: the parameter struct is passed by value");
                for (i, (arg, p)) in desc.args.iter().zip(&params[1..]).enumerate() {
                    let what = format!("{name} argument {} ({})", i + 1, arg.buf.name());
                    assert_eq!(p.pointee_size, Some(arg.buf.elem().size(dtype)), "{what}: element size");
                    assert_eq!(p.pointee_const, arg.access == Access::Read, "{what}: const-ness");
                }
                checked += 1;
            }
        }
    }
    // sgmv 2 + 4 + 4, fused 3 + 4 + 4, gating 3 x 11.
    assert!(checked >= 21 + 3 * 11, "only {checked} descriptions checked");
}
