//! [`MoleError`] as the Python exceptions of `mole/errors.py`: bad input derives from
//! `ValueError`, the device and the driver from `RuntimeError`, all from `mole.MoleError`.

use mole::MoleError;
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;

/// The class in `mole.errors` that `e` is raised as.
fn class_of(e: &MoleError) -> &'static str {
    use MoleError::*;
    match e {
        InvalidSpec { .. } | InvalidK { .. } | InvalidRankOffsets { .. } | ZeroDimension { .. } | Unsupported(_) => {
            "SpecError"
        }
        InvalidParameter { name, .. } if *name == "dtype" => "DTypeError",
        ShapeMismatch { .. }
        | WrongShape { .. }
        | MissingInput { .. }
        | UnexpectedInput { .. }
        | ExpertIdOutOfRange { .. }
        | DuplicateExpert { .. }
        | InvalidOperand { .. }
        | TooLarge { .. } => "ShapeError",
        InvalidParameter { .. } => "InvalidValueError",
        CudaDriverNotFound { .. } | NvrtcNotFound { .. } | CublasNotFound { .. } | Cuda { .. } | OutOfMemory { .. } => {
            "DeviceError"
        }
        NvrtcCompile { .. } => "CompileError",
        _ => "MoleError",
    }
}

/// Raises `e` as its `mole.errors` class (a `RuntimeError` if that module cannot be imported,
/// which only a broken installation does).
pub fn to_py(e: MoleError) -> PyErr {
    Python::attach(|py| match py.import("mole.errors").and_then(|m| m.getattr(class_of(&e))) {
        Ok(cls) => match cls.call1((e.to_string(),)) {
            Ok(obj) => PyErr::from_value(obj),
            Err(err) => err,
        },
        Err(_) => PyRuntimeError::new_err(e.to_string()),
    })
}

/// `Result<T, MoleError>` as a `PyResult<T>`.
pub trait IntoPy<T> {
    /// Converts the error with [`to_py`].
    fn py(self) -> PyResult<T>;
}

impl<T> IntoPy<T> for mole::Result<T> {
    fn py(self) -> PyResult<T> {
        self.map_err(to_py)
    }
}
