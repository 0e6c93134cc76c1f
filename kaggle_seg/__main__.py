from kaggle_seg.cli import main

main()
