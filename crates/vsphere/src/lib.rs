//! vSphere client (work in progress, see issue 3).
