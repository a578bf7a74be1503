// vcsim for reflex's tests: govmomi's VPX simulator on a chosen loopback port, with the
// REST (vapi) endpoints, credentials that are actually checked, and TLS.
//
// Build (GOPATH mode, Debian's golang-github-vmware-govmomi-dev):
//
//	GO111MODULE=off GOPATH=/usr/share/gocode go build -o target/vcsim ./crates/vsphere/vcsim
//
// It prints one line `URL=https://127.0.0.1:PORT/sdk THUMBPRINT=AA:BB:…` once it serves,
// then runs until stdin closes or it gets SIGTERM/SIGINT.
package main

import (
	"crypto/sha1"
	"crypto/tls"
	"flag"
	"fmt"
	"io"
	"net/url"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/vmware/govmomi/simulator"
	_ "github.com/vmware/govmomi/vapi/simulator"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "address to listen on")
	user := flag.String("username", "user", "login user name")
	pass := flag.String("password", "pass", "login password")
	plain := flag.Bool("plain", false, "serve plain HTTP instead of HTTPS")
	idle := flag.Duration("session-idle-timeout", 0, "expire idle sessions after this long (0: never)")
	datastores := flag.Int("ds", 2, "number of datastores")
	flag.Parse()

	if *idle > 0 {
		simulator.SessionIdleTimeout = *idle
	}
	m := simulator.VPX()
	m.Datastore = *datastores
	if err := m.Create(); err != nil {
		fmt.Fprintln(os.Stderr, "vcsim: create:", err)
		os.Exit(1)
	}
	m.Service.RegisterEndpoints = true
	m.Service.Listen = &url.URL{Host: *listen, User: url.UserPassword(*user, *pass)}
	if !*plain {
		m.Service.TLS = new(tls.Config)
	}
	s := m.Service.NewServer()
	u := *s.URL
	u.User = nil
	thumb := ""
	if !*plain {
		sum := sha1.Sum(s.Server.TLS.Certificates[0].Certificate[0])
		parts := make([]string, len(sum))
		for i, b := range sum {
			parts[i] = fmt.Sprintf("%02X", b)
		}
		thumb = strings.Join(parts, ":")
	}
	fmt.Printf("URL=%s THUMBPRINT=%s\n", u.String(), thumb)
	os.Stdout.Sync()

	done := make(chan struct{}, 2)
	go func() {
		io.Copy(io.Discard, os.Stdin)
		done <- struct{}{}
	}()
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		<-sig
		done <- struct{}{}
	}()
	<-done
	s.Close()
	m.Remove()
}
