"""DGL-RSIS (Li et al., arXiv 2509.00598), reconstructed training-free: text parser
(:mod:`.parser`), knowledge table (:mod:`.knowledge`), proposals (:mod:`.proposals`), local
alignment (:mod:`.local`), global alignment (:mod:`.globalalign`), models (:mod:`.model`).
docs/METHOD.md ("DGL-RSIS") documents every choice; :mod:`.options` holds every constant."""
