"""The quantize stage (artifacts/train/ -> artifacts/quant/): which tensor gets which treatment
(quantize), full GPTQ and GPTQ-lite (gptq) and the LQER low-rank correction (lqer, whose factors
evaluation also rebuilds). Imports only pgolf.shared and pgolf.config."""
