"""Studies: one module per notebook, each a validated `Params` dataclass (the notebook's
parameters, same names and defaults as its parameters cell), `load_inputs(params)` (the
models and test images, checked against the parameters), `run(params, inputs) -> results`
(a dict of JSON numbers), `plot_*(results)` (the notebook's figures) and
`reading(results)` (its text, generated from the numbers).

    transferability   01: attack x inference precision matrices, EOT row, RPI column
    amplification     02: error amplification, accuracy against activation bits, Lipschitz
                      estimates, DQ's beta trained live
    bit_selection     03: Lipschitz-guided per-layer bits against uniform, random, reverse
    odgq_curves       04: training curves of natural, FGSM-RS, PGD-7 AT and ODG-Q
    double_win        05: FP vs RPI vs RPI+RPT under the paper's protocol and adaptive attacks
    deployed          06: the int8 ONNX Runtime engine against its fake-quant twin (rqlab.deploy)
    params, common    the parameter checks (zoo names, checkpoint paths, supported bits)
                      and what the studies share (base Params, Results, write_results)

The studies orchestrate `rqlab.analysis` (the research code) for a notebook; they sit
above the zoo and below the report.
"""
