"""Knowledge distillation with ML-CPC (Song & Ermon 2020, Sec. 5.2) in CRD's setting (Tian et al. 2020).

`losses` (pure math), `objective` (the loss with its queue), `config`, `data`, `trainer` (the loop, `run`).
"""
