from esb.server.application import main

main()
