//! Tollgate data plane (the proxy). Built in a later issue; empty for now.
