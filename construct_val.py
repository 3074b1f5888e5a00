"""Make validation networks for Knowledge Translation.

Each is a large network Begin -> BasicBlock -> Last trained as in construct_train.py, from seeds
that never coincide with the training networks'. With --train_simple a SimpleBlock_NoBn is also
retrained between its frozen Begin and Last: the "Retrained" reference of the results tables.

    python construct_val.py --num_data 100 --data_root ./data/val --train_simple
"""
import construct_train
import utils

if __name__ == '__main__':
    utils.run_main(lambda: construct_train.main('val'))
