//! `mole._native`: the extension module under the `mole` Python package (`python/mole`). It
//! parses specs, states each tensor's shape, runs the f64 reference on host buffers and runs
//! compiled layers on device pointers; the Python layer reads the callers' arrays, checks them
//! against `contract` and turns every [`mole::MoleError`] into the exception classes of
//! `mole/errors.py` (`errors`).

mod contract;
mod errors;
mod layer;
mod reference;

use pyo3::prelude::*;

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(contract::spec_json, m)?)?;
    m.add_function(wrap_pyfunction!(contract::preset_json, m)?)?;
    m.add_function(wrap_pyfunction!(contract::presets, m)?)?;
    m.add_function(wrap_pyfunction!(contract::tensors, m)?)?;
    m.add_function(wrap_pyfunction!(contract::gradients, m)?)?;
    m.add_function(wrap_pyfunction!(contract::plan_sizes, m)?)?;
    m.add_function(wrap_pyfunction!(reference::reference_forward, m)?)?;
    m.add_function(wrap_pyfunction!(reference::reference_backward, m)?)?;
    m.add_class::<layer::NativeLayer>()?;
    Ok(())
}
