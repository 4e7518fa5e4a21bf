"""Not a paper: modules several papers share (DESIGN.md: a paper never imports another), e.g. the
recommender-data loaders of `interactions`."""
