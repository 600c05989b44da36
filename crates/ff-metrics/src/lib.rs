//! ff-metrics: placeholder, filled by its issue.
