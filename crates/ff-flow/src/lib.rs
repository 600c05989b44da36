//! ff-flow: placeholder, filled by its issue.
