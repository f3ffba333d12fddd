//! Unit tests of the layer format: round trip and hostile tars.
