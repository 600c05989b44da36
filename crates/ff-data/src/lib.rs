//! ff-data: placeholder, filled by its issue.
