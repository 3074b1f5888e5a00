# the same experiment with the study's 224-network translators too (--inputs folded --output residual): 5 val networks
# (one core, shared 2-core machine; rerun with a larger --num_networks to extend it: finished networks are skipped)
OMP_NUM_THREADS=1 python experiments/warm_start.py --num_networks 5 \
    --translator 'faithful MSE (demo)=runs/warm/18.57.pth' \
    --translator 'functional + perm (demo)=runs/warm/perm/34.29.pth' \
    --translator 'functional_perm_folded_residual_224=runs/warm/study/functional_perm_folded_residual_224.pth' \
    --translator 'mse_folded_residual_224=runs/warm/study/mse_folded_residual_224.pth' \
    --out results/warm_start/with_study/warm_start.json 2>&1 | tee -a results/warm_start/with_study/warm_start.log
