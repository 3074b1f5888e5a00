# the run committed here (10 validation networks, one core; about 100 s a network on the shared 2-core machine)
OMP_NUM_THREADS=1 python experiments/warm_start.py --num_networks 10 \
    --translator 'faithful MSE (demo)=runs/warm/18.57.pth' \
    --translator 'functional + perm (demo)=runs/warm/perm/34.29.pth' \
    --out results/warm_start/warm_start.json 2>&1 | tee results/warm_start/warm_start.log
