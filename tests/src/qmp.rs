//! QMP: the harness uses the scheduler's QMP client (one implementation for both).

pub use scheduler::drivers::qmp::QmpClient as Qmp;

impl From<scheduler::drivers::DriverError> for crate::LabError {
    fn from(e: scheduler::drivers::DriverError) -> Self {
        crate::LabError::Qmp(e.to_string())
    }
}
