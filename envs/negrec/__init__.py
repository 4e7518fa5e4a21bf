"""CoNRec: negative-feedback recommendation on MovieLens-100k (issue 14)."""
