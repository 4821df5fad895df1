from loralens.cli import main

main()
