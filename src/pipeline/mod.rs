//! (4) Pipelines. So far: the expression and template engine (`expr`) and its domain
//! filters (`filters`); pipeline files, steps, routing and the worker follow (issue 3).

pub mod capture;
pub mod expr;
pub mod filters;
pub mod numeric_mul;
pub mod run;
pub mod spec;
pub mod test_case;
