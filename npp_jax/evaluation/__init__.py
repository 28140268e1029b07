"""Sample-quality evaluation: ADM-compatible statistics, FID Inception features, the digit judge."""
