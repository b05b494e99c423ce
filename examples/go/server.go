// A Go net/http server (standard library only) that serves from the socket cluster-lb hands it
// (socket activation: fd 3, through os.NewFile and net.FileListener), answers
// `worker ID pid PID`, says READY=1 on NOTIFY_SOCKET once it accepts, and on SIGTERM drains
// with http.Server.Shutdown.
//
//	go build -o server ./examples/go
//	sudo cluster-lb run -w 4 --listen 127.0.0.1:8080 -- ./server
package main

import (
	"context"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"sync/atomic"
	"syscall"
	"time"
)

// How long a stopping server keeps answering on open keep-alive connections (with
// `Connection: close`) before Shutdown closes the idle ones. Shutdown closes an idle keep-alive
// connection at once, which races a request the client is already sending on it; a client that
// keeps using its connection sends its next request within this time, gets its answer and the
// close, and reconnects to another worker.
const drainBeforeShutdown = time.Second

// listenFdsStart is the first fd of systemd's socket-activation protocol.
const listenFdsStart = 3

func main() {
	listener, err := listener()
	if err != nil {
		log.Fatalf("go-server: %v", err)
	}
	worker := os.Getenv("CLUSTER_LB_WORKER_ID")
	if worker == "" {
		worker = "-"
	}
	body := fmt.Sprintf("worker %s pid %d\n", worker, os.Getpid())
	var draining atomic.Bool
	server := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		if draining.Load() {
			w.Header().Set("Connection", "close")
		}
		w.Header().Set("Content-Type", "text/plain")
		fmt.Fprint(w, body)
	})}

	stopped := make(chan struct{})
	go func() {
		terminate := make(chan os.Signal, 1)
		signal.Notify(terminate, syscall.SIGTERM, syscall.SIGINT)
		<-terminate
		draining.Store(true)
		time.Sleep(drainBeforeShutdown)
		ctx, cancel := context.WithTimeout(context.Background(), 25*time.Second)
		defer cancel()
		if err := server.Shutdown(ctx); err != nil {
			log.Printf("go-server: shutdown: %v", err)
		}
		close(stopped)
	}()

	notifyReady()
	if err := server.Serve(listener); err != http.ErrServerClosed {
		log.Fatalf("go-server: %v", err)
	}
	<-stopped
}

// listener is fd 3 when socket activation meant it for this process, else a bind on PORT.
func listener() (net.Listener, error) {
	fds, _ := strconv.Atoi(os.Getenv("LISTEN_FDS"))
	if os.Getenv("LISTEN_PID") == strconv.Itoa(os.Getpid()) && fds >= 1 {
		file := os.NewFile(listenFdsStart, "listen0")
		defer file.Close() // FileListener made its own copy of the fd.
		return net.FileListener(file)
	}
	port := os.Getenv("PORT")
	if port == "" {
		port = "8080"
	}
	return net.Listen("tcp", ":"+port)
}

// notifyReady tells cluster-lb (or systemd) that the server accepts: READY=1 on NOTIFY_SOCKET
// (a leading '@' is an abstract address, which Go's unixgram dialer understands as is).
func notifyReady() {
	path := os.Getenv("NOTIFY_SOCKET")
	if path == "" {
		return
	}
	conn, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		log.Printf("go-server: READY=1 not sent: %v", err)
		return
	}
	defer conn.Close()
	if _, err := conn.Write([]byte("READY=1")); err != nil {
		log.Printf("go-server: READY=1 not sent: %v", err)
	}
}
