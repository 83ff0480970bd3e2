from aptp.cli.main import main

main()
