from pilotlab.cli import main

main()
